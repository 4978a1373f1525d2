//! Diagnostics: `FILE:LINE:COL: error[CODE]: message`, a source excerpt and a hint.

use std::fmt::Write;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable code, e.g. `E004`; documented in the user guide.
    pub code: &'static str,
    pub message: String,
    /// Byte range in the source the finding is about.
    pub span: Range<usize>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// A source text with its name, for line/column lookups.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(name: &'a str, text: &'a str) -> Source<'a> {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source {
            name,
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let start = self.line_starts[line];
        let col = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, col + 1)
    }

    fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self.line_starts.get(line).copied().unwrap_or(self.text.len());
        self.text.get(start..end).unwrap_or("").trim_end_matches(['\n', '\r'])
    }

    /// Renders one diagnostic the way `understudy check` prints it.
    pub fn render(&self, d: &Diagnostic) -> String {
        let (line, col) = self.line_col(d.span.start);
        let level = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut out = format!("{}:{line}:{col}: {level}[{}]: {}\n", self.name, d.code, d.message);
        let text = self.line_text(line);
        let gutter = line.to_string().len();
        let _ = writeln!(out, "{:gutter$} |", "");
        let _ = writeln!(out, "{line} | {text}");
        let span_end = d
            .span
            .end
            .min(self.line_starts.get(line).copied().unwrap_or(self.text.len()));
        let width = self
            .text
            .get(d.span.start.min(span_end)..span_end)
            .map_or(1, |s| s.trim_end_matches(['\n', '\r']).chars().count().max(1));
        let _ = writeln!(out, "{:gutter$} | {:pad$}{}", "", "", "^".repeat(width), pad = col - 1);
        if let Some(hint) = &d.hint {
            let _ = writeln!(out, "{:gutter$} = hint: {hint}", "");
        }
        out
    }

    /// Renders every diagnostic, then a summary line.
    pub fn render_all(&self, diags: &[Diagnostic]) -> String {
        let mut out = String::new();
        for d in diags {
            out.push_str(&self.render(d));
        }
        let errors = diags.iter().filter(|d| d.is_error()).count();
        let warnings = diags.len() - errors;
        if errors > 0 {
            let _ = writeln!(
                out,
                "{}: {} error{}, {} warning{}; not accepted",
                self.name,
                errors,
                plural(errors),
                warnings,
                plural(warnings)
            );
        } else if warnings > 0 {
            let _ = writeln!(out, "{}: ok, {} warning{}", self.name, warnings, plural(warnings));
        }
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The closest of `candidates` to `word`, if close enough to suggest.
pub fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let src = Source::new("f.toml", "a = 1\nβγ = \"x\"\n");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(6), (2, 1));
        // `=` after two 2-byte characters and a space.
        assert_eq!(src.line_col(11), (2, 4));
    }

    #[test]
    fn suggestions_only_when_close() {
        assert_eq!(did_you_mean("depend_on", ["depends_on", "kind"]), Some("depends_on"));
        assert_eq!(did_you_mean("zzz", ["depends_on", "kind"]), None);
    }
}
