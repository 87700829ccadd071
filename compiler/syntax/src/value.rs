//! The value grammars inside strings: sizes, durations, ports and `${param}` templates.
//!
//! Each grammar is a small `nom` parser over the string's content. Errors carry a byte range
//! *within the string*; [`crate::Value::content_span`] maps it onto the source so the label
//! lands on the exact bad characters.

use std::ops::Range;
use std::time::Duration;

use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::character::complete::{char, digit1};
use nom::combinator::{opt, recognize};
use nom::sequence::pair;
use nom::{IResult, Parser};

use crate::suggest::did_you_mean;

/// A value grammar error, with the offending byte range inside the string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    /// Byte range within the string content.
    pub range: Range<usize>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl ValueError {
    fn new(range: Range<usize>, message: impl Into<String>) -> Self {
        ValueError {
            range,
            message: message.into(),
            help: None,
        }
    }

    fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

type NomResult<'a, T> = IResult<&'a str, T, nom::error::Error<&'a str>>;

fn offset(full: &str, rest: &str) -> usize {
    full.len() - rest.len()
}

/// `123` or `1.5`.
fn decimal(i: &str) -> NomResult<'_, &str> {
    recognize(pair(digit1, opt(pair(char('.'), digit1)))).parse(i)
}

fn unit_word(i: &str) -> NomResult<'_, &str> {
    take_while(|c: char| c.is_ascii_alphabetic()).parse(i)
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("K", 1 << 10),
    ("KiB", 1 << 10),
    ("M", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1 << 40),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// Parses a size: a number and an optional unit (`512MiB`, `1.5GiB`, `4G`, `1000000KB`,
/// `4096` bytes). `K`/`M`/`G`/`T` and the `iB` forms are binary; `KB`/`MB`/... are decimal.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let (rest, num) = decimal(s).map_err(|_| {
        ValueError::new(0..s.len(), format!("`{s}` is not a size"))
            .help("write a number and a unit, e.g. `512MiB` or `4GiB`")
    })?;
    let unit_start = offset(s, rest);
    let (rest, unit) = unit_word(rest).unwrap_or((rest, ""));
    if !rest.is_empty() {
        let at = offset(s, rest);
        return Err(
            ValueError::new(at..s.len(), format!("unexpected `{rest}` in size"))
                .help("write a number and a unit, e.g. `512MiB`"),
        );
    }
    let multiplier = if unit.is_empty() {
        1
    } else if let Some((_, m)) = SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
        *m
    } else {
        let err = ValueError::new(unit_start..s.len(), format!("unknown size unit `{unit}`"));
        return Err(
            match did_you_mean(unit, SIZE_UNITS.iter().map(|(u, _)| *u)) {
                Some(h) => err.help(h),
                None => err.help("units are B, KiB, MiB, GiB, TiB (binary) or KB, MB, GB, TB"),
            },
        );
    };
    let overflow = || ValueError::new(0..s.len(), format!("size `{s}` is too large"));
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int.parse().map_err(|_| overflow())?;
    let mut bytes = int.checked_mul(multiplier).ok_or_else(overflow)?;
    if !frac.is_empty() {
        // Exact decimal arithmetic: 1.5GiB is 1.5 * 2^30 bytes, and 0.1B is an error, not 0.
        let digits = u32::try_from(frac.len()).map_err(|_| overflow())?;
        let denom = 10u128.checked_pow(digits).ok_or_else(overflow)?;
        let f: u128 = frac.parse().map_err(|_| overflow())?;
        let num = f.checked_mul(u128::from(multiplier)).ok_or_else(overflow)?;
        if num % denom != 0 {
            return Err(ValueError::new(
                0..s.len(),
                format!("`{s}` is not a whole number of bytes"),
            ));
        }
        let extra = u64::try_from(num / denom).map_err(|_| overflow())?;
        bytes = bytes.checked_add(extra).ok_or_else(overflow)?;
    }
    Ok(bytes)
}

const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Parses a duration: one or more `<integer><unit>` groups, units `ms`, `s`, `m`, `h`, `d`
/// (`5m`, `1h30m`, `500ms`).
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    if s.is_empty() {
        return Err(ValueError::new(0..0, "empty duration").help("write e.g. `5m`, `1h30m`, `30s`"));
    }
    let mut rest = s;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let start = offset(s, rest);
        let parsed: NomResult<'_, (&str, &str)> = (digit1, unit_word).parse(rest);
        let (next, (num, unit)) = parsed.map_err(|_| {
            let bad = rest.chars().next().map_or(1, char::len_utf8);
            ValueError::new(
                start..start + bad,
                format!("expected a number in duration `{s}`"),
            )
            .help("write e.g. `5m`, `1h30m`, `30s`")
        })?;
        let unit_start = start + num.len();
        if unit.is_empty() {
            return Err(
                ValueError::new(unit_start..unit_start, "missing duration unit")
                    .help("units are ms, s, m, h, d"),
            );
        }
        let Some((_, ms)) = DURATION_UNITS.iter().find(|(u, _)| *u == unit) else {
            let err = ValueError::new(
                unit_start..unit_start + unit.len(),
                format!("unknown duration unit `{unit}`"),
            );
            return Err(
                match did_you_mean(unit, DURATION_UNITS.iter().map(|(u, _)| *u)) {
                    Some(h) => err.help(h),
                    None => err.help("units are ms, s, m, h, d"),
                },
            );
        };
        let overflow = || ValueError::new(0..s.len(), format!("duration `{s}` is too long"));
        let n: u64 = num.parse().map_err(|_| overflow())?;
        total = n
            .checked_mul(*ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(overflow)?;
        rest = next;
    }
    Ok(Duration::from_millis(total))
}

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

/// `3000`, `3000/udp`, `8080:3000` (host:guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    /// Host port, when it differs from the guest port.
    pub host: Option<u16>,
    /// Port inside the guest.
    pub guest: u16,
    /// Protocol.
    pub protocol: Protocol,
}

fn port_number(full: &str, i: &str) -> Result<(u16, usize), ValueError> {
    let start = offset(full, i);
    let r: NomResult<'_, &str> = digit1(i);
    let (_, digits) = r.map_err(|_| {
        ValueError::new(
            start..start + i.len().min(1),
            format!("expected a port number in `{full}`"),
        )
        .help("ports look like `3000`, `3000/udp` or `8080:3000` (host:guest)")
    })?;
    let range = start..start + digits.len();
    match digits.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok((u16::try_from(p).unwrap_or(u16::MAX), digits.len())),
        _ => Err(
            ValueError::new(range, format!("port {digits} is out of range"))
                .help("ports are 1 to 65535"),
        ),
    }
}

/// Checks an integer port.
pub fn check_port(n: i128) -> Result<u16, ValueError> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
        ValueError::new(0..0, format!("port {n} is out of range")).help("ports are 1 to 65535")
    })
}

/// Parses a port spec.
pub fn parse_port(s: &str) -> Result<PortSpec, ValueError> {
    let (first, used) = port_number(s, s)?;
    let mut rest = &s[used..];
    let mut spec = PortSpec {
        host: None,
        guest: first,
        protocol: Protocol::Tcp,
    };
    if let Some(r) = rest.strip_prefix(':') {
        let (guest, used) = port_number(s, r)?;
        spec.host = Some(first);
        spec.guest = guest;
        rest = &r[used..];
    }
    if let Some(r) = rest.strip_prefix('/') {
        let start = offset(s, r);
        let proto: NomResult<'_, &str> = alt((tag("tcp"), tag("udp"))).parse(r);
        match proto {
            Ok(("", p)) => {
                spec.protocol = if p == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                rest = "";
            }
            _ => {
                return Err(
                    ValueError::new(start..s.len(), format!("unknown protocol `{r}`"))
                        .help("protocols are `tcp` and `udp`"),
                );
            }
        }
    }
    if !rest.is_empty() {
        let at = offset(s, rest);
        return Err(
            ValueError::new(at..s.len(), format!("unexpected `{rest}` in port"))
                .help("ports look like `3000`, `3000/udp` or `8080:3000` (host:guest)"),
        );
    }
    Ok(spec)
}

/// A piece of a `${param}` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text (with `$${` already turned into `${`).
    Text(String),
    /// `${name}`; the range covers the name inside the string.
    Param {
        /// The param name.
        name: String,
        /// Byte range of the name within the string.
        range: Range<usize>,
    },
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn ident(i: &str) -> NomResult<'_, &str> {
    recognize(pair(take_while1(is_ident_start), take_while(is_ident_char))).parse(i)
}

/// Splits a string into literal text and `${name}` references. `$${` is a literal `${` (for
/// shell variables in commands); a `$` not followed by `{` is literal too.
pub fn parse_template(s: &str) -> Result<Vec<Piece>, ValueError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        text.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(r) = after.strip_prefix("$${") {
            text.push_str("${");
            rest = r;
            continue;
        }
        let Some(body) = after.strip_prefix("${") else {
            text.push('$');
            rest = &after[1..];
            continue;
        };
        let open = offset(s, after);
        let name_start = offset(s, body);
        let parsed: NomResult<'_, &str> = ident(body);
        let Ok((r, name)) = parsed else {
            let end = body.find('}').map_or(s.len(), |e| name_start + e);
            return Err(ValueError::new(
                open..(end + 1).min(s.len()),
                "expected a param name after `${`",
            )
            .help("param names are letters, digits, `_` and `-`; write `$${` for a literal `${`"));
        };
        let Some(r) = r.strip_prefix('}') else {
            return Err(
                ValueError::new(open..offset(s, r), "unterminated `${`").help(format!(
                    "close it: `${{{name}}}`; write `$${{` for a literal `${{`"
                )),
            );
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(Piece::Param {
            name: name.to_owned(),
            range: name_start..name_start + name.len(),
        });
        rest = r;
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("7B"), Ok(7));
    }

    #[test]
    fn bad_sizes_point_at_the_bad_part() {
        let e = parse_size("512Mib").expect_err("bad unit");
        assert_eq!(e.range, 3..6);
        assert_eq!(e.help.as_deref(), Some("did you mean `MiB`?"));
        assert_eq!(parse_size("lots").expect_err("no number").range, 0..4);
        assert_eq!(parse_size("1 GiB").expect_err("space").range, 1..5);
        assert!(parse_size("0.1B").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations_parse_and_sum_groups() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        let e = parse_duration("5min").expect_err("bad unit");
        assert_eq!(e.range, 1..4);
        assert_eq!(parse_duration("5").expect_err("no unit").range, 1..1);
        assert_eq!(parse_duration("1hx").expect_err("junk").range, 1..3);
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn ports_parse_mappings_and_protocols() {
        assert_eq!(
            parse_port("3000"),
            Ok(PortSpec {
                host: None,
                guest: 3000,
                protocol: Protocol::Tcp
            })
        );
        assert_eq!(
            parse_port("8080:3000/udp"),
            Ok(PortSpec {
                host: Some(8080),
                guest: 3000,
                protocol: Protocol::Udp
            })
        );
        assert_eq!(parse_port("70000").expect_err("range").range, 0..5);
        assert_eq!(parse_port("80:0").expect_err("zero").range, 3..4);
        assert_eq!(parse_port("80/sctp").expect_err("proto").range, 3..7);
        assert_eq!(parse_port("80x").expect_err("junk").range, 2..3);
        assert!(check_port(0).is_err());
        assert_eq!(check_port(22), Ok(22));
    }

    #[test]
    fn templates_split_params_and_keep_escapes() {
        assert_eq!(
            parse_template("node-v${node_version}.tar"),
            Ok(vec![
                Piece::Text("node-v".into()),
                Piece::Param {
                    name: "node_version".into(),
                    range: 8..20
                },
                Piece::Text(".tar".into()),
            ])
        );
        assert_eq!(
            parse_template("echo $HOME $${PATH}"),
            Ok(vec![Piece::Text("echo $HOME ${PATH}".into())])
        );
        assert_eq!(
            parse_template("${a"),
            Err(ValueError {
                range: 0..3,
                message: "unterminated `${`".into(),
                help: Some("close it: `${a}`; write `$${` for a literal `${`".into()),
            })
        );
        assert_eq!(parse_template("x${ 1}").expect_err("bad name").range, 1..6);
        assert_eq!(parse_template(""), Ok(vec![]));
    }
}
