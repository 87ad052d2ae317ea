//! A unified diff of a changeset against the baseline's contents. Paths and symlink targets
//! in it are always escaped ([`escape_path`]); file contents are as the guest wrote them, so
//! a terminal should only see them through [`escape_terminal`].

use std::{borrow::Cow, collections::BTreeMap};

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
        let shown = |p: &str| escape_path(p).into_owned();
        let raw = |p: &str| p.to_string();
        let (path, from, to) = match c {
            Change::Rename { from, to, .. } => (raw(to), shown(from), shown(to)),
            _ => {
                let p = c.paths()[0];
                (raw(p), shown(p), shown(p))
            }
        };
        let quoted = &to;
        match c {
            Change::Write {
                mode,
                data,
                added,
                binary,
                ..
            } => {
                out += &format!("diff --git a/{quoted} b/{quoted}\n");
                let old = base.get(&path).map(Vec::as_slice).unwrap_or_default();
                if *added {
                    out += &format!("new file mode 100{mode:o}\n");
                } else if modes.get(&path).is_some_and(|m| m != mode) {
                    out += &format!("old mode 100{:o}\nnew mode 100{mode:o}\n", modes[&path]);
                }
                let from = if *added {
                    "/dev/null".to_string()
                } else {
                    format!("a/{quoted}")
                };
                if *binary || crate::changeset::is_binary(old) {
                    out += &format!("Binary files {from} and b/{quoted} differ\n");
                } else {
                    out += &text_diff(&from, &format!("b/{quoted}"), old, data);
                }
            }
            Change::Symlink { target, .. } => {
                let target = escape_path(target);
                out += &format!(
                    "diff --git a/{quoted} b/{quoted}\nnew file mode 120000\n--- /dev/null\n+++ b/{quoted}\n@@ -0,0 +1 @@\n+{target}\n\\ No newline at end of file\n"
                );
            }
            Change::Delete { .. } => {
                out += &format!("diff --git a/{quoted} b/{quoted}\ndeleted file\n");
                if let Some(old) = base.get(&path) {
                    if crate::changeset::is_binary(old) {
                        out += &format!("Binary files a/{quoted} and /dev/null differ\n");
                    } else {
                        out += &text_diff(&format!("a/{quoted}"), "/dev/null", old, b"");
                    }
                }
            }
            Change::Rename {
                from: old, mode, ..
            } => {
                out += &format!("diff --git a/{from} b/{to}\n");
                if modes.get(old).is_some_and(|m| m != mode) {
                    out += &format!("old mode 100{:o}\nnew mode 100{mode:o}\n", modes[old]);
                }
                out += &format!("similarity index 100%\nrename from {from}\nrename to {to}\n");
            }
            Change::Chmod { mode, .. } => {
                let old = modes.get(&path).copied().unwrap_or(0o644);
                out += &format!(
                    "diff --git a/{quoted} b/{quoted}\nold mode 100{old:o}\nnew mode 100{mode:o}\n"
                );
            }
            Change::Mkdir { .. } => out += &format!("new empty directory {quoted}/\n"),
            Change::Rmdir { .. } => out += &format!("removed empty directory {quoted}/\n"),
        }
    }
    out
}

/// Whether a character must not reach a terminal raw: control characters (C0, DEL, C1, so
/// ANSI escape sequences too) and the Unicode bidirectional overrides that reorder text.
fn dangerous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_char(out: &mut String, c: char) {
    match c {
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
        c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
    }
}

/// A guest-made path (or symlink target) fit to print: control characters, bidirectional
/// overrides and backslashes escaped (`\x1b`, `\n`, `\u{202e}`, `\\`).
pub fn escape_path(path: &str) -> Cow<'_, str> {
    if !path.chars().any(|c| dangerous(c) || c == '\\') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for c in path.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if dangerous(c) => escape_char(&mut out, c),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Text fit for a terminal: every control character but newline and tab, and every
/// bidirectional override, shown escaped instead of interpreted.
pub fn escape_terminal(text: &str) -> Cow<'_, str> {
    let keep = |c: char| c == '\n' || c == '\t';
    if !text.chars().any(|c| dangerous(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if dangerous(c) && !keep(c) {
            escape_char(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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

    #[test]
    fn guest_bytes_are_escaped_for_terminals() {
        assert_eq!(escape_path("plain/path.txt"), "plain/path.txt");
        assert_eq!(
            escape_path("a\x1b[2Jb\nc\\d\u{202e}e\u{9b}"),
            "a\\x1b[2Jb\\nc\\\\d\\u{202e}e\\u{9b}"
        );
        assert_eq!(escape_terminal("keep\tthis\n"), "keep\tthis\n");
        assert_eq!(
            escape_terminal("+\x1b]0;pwned\x07\r\n"),
            "+\\x1b]0;pwned\\x07\\r\n"
        );
    }
}
