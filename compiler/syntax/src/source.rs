//! Source files, byte spans and line/column positions.

use std::fmt;
use std::sync::Arc;

/// Identifies a source file inside a [`Files`] database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A half-open byte range `[start, end)` into one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// A span from `start` to `end`.
    pub fn new(start: usize, end: usize) -> Self {
        Span {
            start,
            end: end.max(start),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the span covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The sub-span `[start + from, start + to)`, clamped to this span.
    pub fn sub(&self, from: usize, to: usize) -> Span {
        let s = (self.start + from).min(self.end);
        let e = (self.start + to).min(self.end);
        Span::new(s, e)
    }
}

impl From<miette::SourceSpan> for Span {
    fn from(s: miette::SourceSpan) -> Self {
        Span::new(s.offset(), s.offset() + s.len())
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> Self {
        (s.start, s.len()).into()
    }
}

/// A 1-based line and 1-based column, the column counted in Unicode scalar values (what
/// editors and miette show), not bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCol {
    /// 1-based line.
    pub line: usize,
    /// 1-based column in characters.
    pub col: usize,
}

impl fmt::Display for LineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One source file: its display name, text and line starts.
#[derive(Debug, Clone)]
pub struct SourceFile {
    name: String,
    text: Arc<str>,
    line_starts: Vec<usize>,
}

impl SourceFile {
    /// Builds the line index of `text`.
    pub fn new(name: impl Into<String>, text: impl Into<Arc<str>>) -> Self {
        let text: Arc<str> = text.into();
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceFile {
            name: name.into(),
            text,
            line_starts,
        }
    }

    /// The display name (a path as the user wrote it, or `<stdlib>/node.kdl`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full text.
    pub fn text(&self) -> &Arc<str> {
        &self.text
    }

    /// Line and column of a byte offset. Offsets past the end or inside a UTF-8 sequence are
    /// clamped to the nearest preceding character boundary, so this never panics.
    pub fn line_col(&self, offset: usize) -> LineCol {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        LineCol {
            line: line + 1,
            col,
        }
    }
}

/// All source files of one compilation. The syntax crate never reads files: callers add them.
#[derive(Debug, Clone, Default)]
pub struct Files {
    files: Vec<SourceFile>,
}

impl Files {
    /// An empty database.
    pub fn new() -> Self {
        Files::default()
    }

    /// Adds a file and returns its id.
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<Arc<str>>) -> FileId {
        let id = FileId(u32::try_from(self.files.len()).unwrap_or(u32::MAX));
        self.files.push(SourceFile::new(name, text));
        id
    }

    /// The file with this id.
    ///
    /// # Panics
    /// If the id did not come from this database (a programming error, not an input error).
    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_is_one_based_and_counts_characters() {
        let f = SourceFile::new("t", "ab\n\u{e9}x\n\nz");
        assert_eq!(f.line_col(0), LineCol { line: 1, col: 1 });
        assert_eq!(f.line_col(1), LineCol { line: 1, col: 2 });
        // The newline itself belongs to the line it ends.
        assert_eq!(f.line_col(2), LineCol { line: 1, col: 3 });
        assert_eq!(f.line_col(3), LineCol { line: 2, col: 1 });
        // 'é' is two bytes: 'x' is at byte 5 but column 2.
        assert_eq!(f.line_col(5), LineCol { line: 2, col: 2 });
        assert_eq!(f.line_col(7), LineCol { line: 3, col: 1 });
        assert_eq!(f.line_col(8), LineCol { line: 4, col: 1 });
    }

    #[test]
    fn line_col_clamps_bad_offsets() {
        let f = SourceFile::new("t", "\u{e9}");
        assert_eq!(f.line_col(1), LineCol { line: 1, col: 1 });
        assert_eq!(f.line_col(99), LineCol { line: 1, col: 2 });
    }
}
