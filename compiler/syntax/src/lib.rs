//! The spec language: KDL source to a spanned AST, value grammars and diagnostics. No I/O.
