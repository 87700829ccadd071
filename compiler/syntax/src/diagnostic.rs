//! The diagnostic type every stage of the front end reports, and its miette and JSON views.

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, NamedSource};
use serde::Serialize;

use crate::source::{FileId, Files, Span};

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// A stable diagnostic code. The string form (`specc::unknown-node`) is part of the
        /// public interface: tools match on it, so a code is never renamed or reused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $($(#[$doc])* $variant,)*
        }

        impl Code {
            /// Every code, in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The stable string form, e.g. `specc::unknown-node`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => concat!("specc::", $name),)*
                }
            }
        }
    };
}

codes! {
    /// The text is not valid KDL v2.
    KdlSyntax => "kdl-syntax",
    /// A size such as `512MiB` does not parse.
    BadSize => "bad-size",
    /// A duration such as `5m` does not parse.
    BadDuration => "bad-duration",
    /// A port or port mapping does not parse or is out of range.
    BadPort => "bad-port",
    /// A `${...}` interpolation is malformed.
    BadInterpolation => "bad-interpolation",
    /// A node name the language does not have in this position.
    UnknownNode => "unknown-node",
    /// A property the node does not take.
    UnknownProperty => "unknown-property",
    /// More positional arguments than the node takes.
    UnexpectedArgument => "unexpected-argument",
    /// A required positional argument is missing.
    MissingArgument => "missing-argument",
    /// A required property is missing.
    MissingProperty => "missing-property",
    /// A children block on a node that takes none.
    UnexpectedChildren => "unexpected-children",
    /// A value of the wrong KDL type (string where an integer is needed, ...).
    WrongType => "wrong-type",
    /// A value of the right type but not an allowed one (out of range, unknown keyword).
    BadValue => "bad-value",
    /// A required node is missing.
    MissingNode => "missing-node",
    /// A node that may appear once appears again.
    DuplicateNode => "duplicate-node",
    /// A property given twice on one node.
    DuplicateProperty => "duplicate-property",
    /// Two layers with the same name.
    DuplicateLayer => "duplicate-layer",
    /// Two params, secrets, users, groups or services with the same name.
    DuplicateName => "duplicate-name",
    /// A layer, param or other name that is not a valid identifier or is reserved.
    BadName => "bad-name",
    /// `after=` names a layer that does not exist.
    UnknownLayer => "unknown-layer",
    /// The `after=` edges form a cycle.
    LayerCycle => "layer-cycle",
    /// `${name}` names a param that is not declared.
    UnknownParam => "unknown-param",
    /// A param without a default got no value.
    MissingParam => "missing-param",
    /// A step names a secret that is not declared.
    UnknownSecret => "unknown-secret",
    /// `use` names an integration that does not exist.
    UnknownIntegration => "unknown-integration",
    /// An imported file or base spec does not exist or cannot be read.
    ImportMissing => "import-missing",
    /// Imports (or `base spec=`) form a cycle.
    ImportCycle => "import-cycle",
    /// A `copy` source does not exist or cannot be read.
    CopySourceMissing => "copy-source-missing",
    /// A guest path that must be absolute is relative.
    RelativePath => "relative-path",
    /// The `vm kernel=` file does not exist or cannot be read.
    KernelMissing => "kernel-missing",
    /// A param that nothing uses (warning).
    UnusedParam => "unused-param",
    /// `specc fmt` would drop a comment or other text here (a limit of the formatter); the
    /// file is left as it is.
    FormatWouldLose => "format-would-lose",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad a diagnostic is. Any `Error` makes `specc check` exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// The spec is valid but probably not what was meant.
    Warning,
    /// The spec cannot be planned.
    Error,
}

impl Severity {
    /// `"error"` or `"warning"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// A span in a file with a short text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The file the span is in.
    pub file: FileId,
    /// The exact bytes the label points at.
    pub span: Span,
    /// What is wrong there, in a few words.
    pub text: String,
}

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Stable code.
    pub code: Code,
    /// Error or warning.
    pub severity: Severity,
    /// One sentence.
    pub message: String,
    /// Where the problem is.
    pub primary: Label,
    /// Further places that explain it ("first defined here"). Only labels in the primary
    /// label's file are drawn by miette; the JSON view keeps all of them.
    pub secondary: Vec<Label>,
    /// How to fix it, when we know.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error at `span` in `file`.
    pub fn error(code: Code, file: FileId, span: Span, message: impl Into<String>) -> Self {
        let message = message.into();
        Diagnostic {
            code,
            severity: Severity::Error,
            primary: Label {
                file,
                span,
                text: String::new(),
            },
            message,
            secondary: Vec::new(),
            help: None,
        }
    }

    /// A warning at `span` in `file`.
    pub fn warning(code: Code, file: FileId, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, file, span, message)
        }
    }

    /// Sets the primary label's text.
    pub fn with_label(mut self, text: impl Into<String>) -> Self {
        self.primary.text = text.into();
        self
    }

    /// Sets the help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Sets the help line if there is one.
    pub fn with_help_opt(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }

    /// Adds a secondary label.
    pub fn with_secondary(mut self, file: FileId, span: Span, text: impl Into<String>) -> Self {
        self.secondary.push(Label {
            file,
            span,
            text: text.into(),
        });
        self
    }

    /// Whether this is an error (not a warning).
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// A miette report of this diagnostic over its source file, for graphical rendering.
    pub fn to_miette(&self, files: &Files) -> MietteDiagnostic {
        let file = files.get(self.primary.file);
        let mut labels = vec![LabeledSpan::new_with_span(
            Some(if self.primary.text.is_empty() {
                "here".into()
            } else {
                self.primary.text.clone()
            }),
            self.primary.span,
        )];
        labels.extend(
            self.secondary
                .iter()
                .filter(|l| l.file == self.primary.file)
                .map(|l| LabeledSpan::new_with_span(Some(l.text.clone()), l.span)),
        );
        MietteDiagnostic {
            code: self.code,
            severity: self.severity,
            message: self.message.clone(),
            help: self.help.clone(),
            labels,
            source: NamedSource::new(file.name(), Arc::clone(file.text())),
        }
    }

    /// The plain-data view used by `--format json`.
    pub fn to_record(&self, files: &Files) -> Record {
        let file = files.get(self.primary.file);
        let pos = file.line_col(self.primary.span.start);
        let end = file.line_col(self.primary.span.end);
        Record {
            code: self.code.as_str(),
            severity: self.severity.as_str(),
            message: self.message.clone(),
            file: file.name().to_owned(),
            line: pos.line,
            column: pos.col,
            end_line: end.line,
            end_column: end.col,
            label: self.primary.text.clone(),
            help: self.help.clone(),
        }
    }

    /// `FILE:LINE:COL: severity[code]: message` on one line, for logs and tests.
    pub fn to_short(&self, files: &Files) -> String {
        let file = files.get(self.primary.file);
        let pos = file.line_col(self.primary.span.start);
        let mut s = format!(
            "{}:{}: {}[{}]: {}",
            file.name(),
            pos,
            self.severity.as_str(),
            self.code,
            self.message
        );
        if !self.primary.text.is_empty() {
            s.push_str(&format!(" ({})", self.primary.text));
        }
        if let Some(h) = &self.help {
            s.push_str(&format!("; help: {h}"));
        }
        s
    }
}

/// A diagnostic as JSON: `{"code","severity","message","file","line","column",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// `specc::...`.
    pub code: &'static str,
    /// `error` or `warning`.
    pub severity: &'static str,
    /// The message.
    pub message: String,
    /// File name as given.
    pub file: String,
    /// 1-based line of the span start.
    pub line: usize,
    /// 1-based column (characters) of the span start.
    pub column: usize,
    /// 1-based line of the span end.
    pub end_line: usize,
    /// 1-based column of the span end.
    pub end_column: usize,
    /// The primary label.
    pub label: String,
    /// The help line, if any.
    pub help: Option<String>,
}

/// A [`Diagnostic`] bound to its source text, implementing [`miette::Diagnostic`].
#[derive(Debug)]
pub struct MietteDiagnostic {
    code: Code,
    severity: Severity,
    message: String,
    help: Option<String>,
    labels: Vec<LabeledSpan>,
    source: NamedSource<Arc<str>>,
}

impl fmt::Display for MietteDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MietteDiagnostic {}

impl miette::Diagnostic for MietteDiagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code.as_str()))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Warning => miette::Severity::Warning,
            Severity::Error => miette::Severity::Error,
        })
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_kebab_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "duplicate code {s}");
            let name = s.strip_prefix("specc::").expect("prefix");
            assert!(
                name.chars().all(|ch| ch.is_ascii_lowercase() || ch == '-'),
                "{s}"
            );
        }
    }

    #[test]
    fn miette_rendering_shows_the_same_line_and_column_as_the_record() {
        let mut files = Files::new();
        // A multi-byte character before the span on the same line catches byte/char mixups,
        // and the span on line 3 catches off-by-one line counting.
        let text = "spec \"x\" {\n    // é\n    vm memroy=\"1GiB\"\n}\n";
        let f = files.add("dir/a.kdl", text);
        let start = text.find("memroy").expect("present");
        let d = Diagnostic::error(Code::UnknownProperty, f, Span::new(start, start + 6), "bad")
            .with_label("unknown property")
            .with_help("did you mean `memory`?");
        let rec = d.to_record(&files);
        assert_eq!((rec.line, rec.column), (3, 8));
        let mut out = String::new();
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .render_report(&mut out, &d.to_miette(&files))
            .expect("render");
        assert!(out.contains("[dir/a.kdl:3:8]"), "{out}");
        assert!(out.contains("specc::unknown-property"), "{out}");
        assert!(out.contains("did you mean `memory`?"), "{out}");
        assert_eq!(
            d.to_short(&files),
            "dir/a.kdl:3:8: error[specc::unknown-property]: bad (unknown property); help: did you mean `memory`?"
        );
    }
}
