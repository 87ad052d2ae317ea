//! Path globs for the `--allow` list: `*` matches within one path component, `**` matches any
//! number of whole components (also none), `?` one character; everything else is literal.
//!
//! Matching is `globset`'s (compiled to a finite automaton, so a hostile pattern such as
//! `*a*a*a*…b` costs linear time, never exponential backtracking); patterns are translated so
//! that `[`, `]`, `{`, `}` and `\` stay literal, as the list has always treated them.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A compiled `--allow` list.
#[derive(Debug, Clone)]
pub struct AllowList {
    set: GlobSet,
}

impl AllowList {
    /// Compiles `patterns`; an empty list allows nothing (callers treat "no list" apart).
    pub fn new(patterns: &[String]) -> AllowList {
        let mut set = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(&translate(p))
                .literal_separator(true)
                .backslash_escape(false)
                .build()
                .expect("a translated pattern is always a valid glob");
            set.add(glob);
        }
        AllowList {
            set: set.build().expect("valid globs build a set"),
        }
    }

    /// Whether `path` (relative, `/`-separated) matches any pattern.
    pub fn allows(&self, path: &str) -> bool {
        self.set.is_match(path)
    }
}

/// `pattern` in globset's syntax with this list's meaning: empty components dropped, `**`
/// only as a whole component (elsewhere a run of `*` is one `*`), glob metacharacters other
/// than `*` and `?` literal.
fn translate(pattern: &str) -> String {
    let parts: Vec<String> = pattern
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| match c {
            "**" => "**".to_string(),
            c => component(c),
        })
        .collect();
    parts.join("/")
}

fn component(c: &str) -> String {
    let mut out = String::with_capacity(c.len());
    for ch in c.chars() {
        match ch {
            '*' if out.ends_with('*') => {}
            '*' | '?' => out.push(ch),
            '[' | ']' | '{' | '}' | '\\' => {
                out.push('[');
                out.push(ch);
                out.push(']');
            }
            ch => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::AllowList;

    fn matches(pattern: &str, path: &str) -> bool {
        AllowList::new(&[pattern.to_string()]).allows(path)
    }

    #[test]
    fn globs() {
        assert!(matches("**", "a/b/c"));
        assert!(matches("src/**", "src/a/b.rs"));
        assert!(!matches("src/**", "tests/a.rs"));
        assert!(matches("src/*.rs", "src/main.rs"));
        assert!(!matches("src/*.rs", "src/a/main.rs"));
        assert!(matches("**/*.md", "README.md"));
        assert!(matches("**/*.md", "docs/x/y.md"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(!matches("docs", "docs/x"));
    }

    #[test]
    fn metacharacters_other_than_star_and_question_mark_are_literal() {
        assert!(matches("a[b]c", "a[b]c"));
        assert!(!matches("a[b]c", "abc"));
        assert!(matches("{x,y}.rs", "{x,y}.rs"));
        assert!(!matches("{x,y}.rs", "x.rs"));
        assert!(matches("a\\b", "a\\b"));
        assert!(matches("a**b", "axyzb"));
        assert!(!matches("a**b", "ax/yb"));
        assert!(matches("src//*.rs", "src/main.rs"));
    }

    #[test]
    fn a_hostile_pattern_does_not_backtrack() {
        // Exponential for a backtracking matcher (2^30 ways to place the stars); linear here.
        let pattern = format!("{}b", "*a".repeat(30));
        let path = "a".repeat(200);
        assert!(!matches(&pattern, &path));
    }
}
