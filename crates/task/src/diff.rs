//! A unified diff of a changeset against the baseline's contents.

use std::collections::BTreeMap;

use crate::changeset::{Change, Changeset};

/// Line-by-line comparisons bigger than this (lines × lines) are shown as a whole replacement.
const MAX_CELLS: usize = 16_000_000;

/// Lines of context around each hunk.
const CONTEXT: usize = 3;

/// Renders `cs` as a `git`-style unified diff. `base` holds the baseline contents of the files
/// the changeset modifies or renames; `modes` their baseline permission bits.
pub fn unified(
    cs: &Changeset,
    base: &BTreeMap<String, Vec<u8>>,
    modes: &BTreeMap<String, u32>,
) -> String {
    let mut out = String::new();
    for c in &cs.changes {
        match c {
            Change::Write {
                path,
                mode,
                data,
                added,
                binary,
                ..
            } => {
                out += &format!("diff --git a/{path} b/{path}\n");
                let old = base.get(path).map(Vec::as_slice).unwrap_or_default();
                if *added {
                    out += &format!("new file mode 100{mode:o}\n");
                } else if modes.get(path).is_some_and(|m| m != mode) {
                    out += &format!("old mode 100{:o}\nnew mode 100{mode:o}\n", modes[path]);
                }
                let from = if *added {
                    "/dev/null".to_string()
                } else {
                    format!("a/{path}")
                };
                if *binary || crate::changeset::is_binary(old) {
                    out += &format!("Binary files {from} and b/{path} differ\n");
                } else {
                    out += &text_diff(&from, &format!("b/{path}"), old, data);
                }
            }
            Change::Symlink { path, target } => {
                out += &format!(
                    "diff --git a/{path} b/{path}\nnew file mode 120000\n--- /dev/null\n+++ b/{path}\n@@ -0,0 +1 @@\n+{target}\n\\ No newline at end of file\n"
                );
            }
            Change::Delete { path } => {
                out += &format!("diff --git a/{path} b/{path}\ndeleted file\n");
                if let Some(old) = base.get(path) {
                    out += &text_diff(&format!("a/{path}"), "/dev/null", old, b"");
                }
            }
            Change::Rename { from, to, mode } => {
                out += &format!("diff --git a/{from} b/{to}\n");
                if modes.get(from).is_some_and(|m| m != mode) {
                    out += &format!("old mode 100{:o}\nnew mode 100{mode:o}\n", modes[from]);
                }
                out += &format!("similarity index 100%\nrename from {from}\nrename to {to}\n");
            }
            Change::Chmod { path, mode } => {
                let old = modes.get(path).copied().unwrap_or(0o644);
                out += &format!(
                    "diff --git a/{path} b/{path}\nold mode 100{old:o}\nnew mode 100{mode:o}\n"
                );
            }
        }
    }
    out
}

fn lines(data: &[u8]) -> Vec<&str> {
    std::str::from_utf8(data)
        .unwrap_or_default()
        .split_inclusive('\n')
        .collect()
}

/// One edit script step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Same,
    Del,
    Add,
}

/// The edit script between two line lists (longest common subsequence).
fn script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let (n, m) = (a.len(), b.len());
    if n.saturating_mul(m) > MAX_CELLS {
        let mut ops = vec![Op::Del; n];
        ops.extend(vec![Op::Add; m]);
        return ops;
    }
    // lcs[i][j] = LCS length of a[i..], b[j..].
    let mut lcs = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[at(i, j)] = if a[i] == b[j] {
                lcs[at(i + 1, j + 1)] + 1
            } else {
                lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
            };
        }
    }
    let (mut i, mut j, mut ops) = (0, 0, Vec::with_capacity(n + m));
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push(Op::Same);
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[at(i + 1, j)] >= lcs[at(i, j + 1)]) {
            ops.push(Op::Del);
            i += 1;
        } else {
            ops.push(Op::Add);
            j += 1;
        }
    }
    ops
}

fn push_line(out: &mut String, sign: char, line: &str) {
    out.push(sign);
    out.push_str(line);
    if !line.ends_with('\n') {
        out.push_str("\n\\ No newline at end of file\n");
    }
}

/// A unified diff of two texts with file headers, or nothing when they are equal.
pub fn text_diff(from: &str, to: &str, old: &[u8], new: &[u8]) -> String {
    let (a, b) = (lines(old), lines(new));
    let ops = script(&a, &b);
    if ops.iter().all(|o| *o == Op::Same) {
        return String::new();
    }
    let mut out = format!("--- {from}\n+++ {to}\n");
    // Positions (index into ops) of changes, grouped into hunks with context.
    let changed: Vec<usize> = (0..ops.len()).filter(|k| ops[*k] != Op::Same).collect();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k < changed.len() && changed[k] <= end + 2 * CONTEXT + 1 {
            end = changed[k];
            k += 1;
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        // Line numbers at `start`.
        let (mut ai, mut bi) = (0, 0);
        for op in &ops[..start] {
            match op {
                Op::Same => {
                    ai += 1;
                    bi += 1;
                }
                Op::Del => ai += 1,
                Op::Add => bi += 1,
            }
        }
        let alen = ops[start..end].iter().filter(|o| **o != Op::Add).count();
        let blen = ops[start..end].iter().filter(|o| **o != Op::Del).count();
        let a_start = if alen == 0 { ai } else { ai + 1 };
        let b_start = if blen == 0 { bi } else { bi + 1 };
        out += &format!("@@ -{a_start},{alen} +{b_start},{blen} @@\n");
        for op in &ops[start..end] {
            match op {
                Op::Same => {
                    push_line(&mut out, ' ', a[ai]);
                    ai += 1;
                    bi += 1;
                }
                Op::Del => {
                    push_line(&mut out, '-', a[ai]);
                    ai += 1;
                }
                Op::Add => {
                    push_line(&mut out, '+', b[bi]);
                    bi += 1;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_diffs_have_hunks_with_context() {
        let old = b"a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = b"a\nb\nc\nd\nE\nf\ng\nh\ni\nj\nk\n";
        let d = text_diff("a/x", "b/x", old, new);
        assert_eq!(
            d,
            "--- a/x\n+++ b/x\n@@ -2,9 +2,10 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n i\n j\n+k\n"
        );
        assert_eq!(text_diff("a", "b", old, old), "");
        let added = text_diff("/dev/null", "b/n", b"", b"x");
        assert_eq!(
            added,
            "--- /dev/null\n+++ b/n\n@@ -0,0 +1,1 @@\n+x\n\\ No newline at end of file\n"
        );
    }
}
