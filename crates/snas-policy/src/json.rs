//! Strict JSON for the signed form: the JWS header and the claims are read with
//! [`parse_strict`] before any schema, so that SNAS and any other verifier of the same token
//! (a reviewer, an audit tool, another JOSE library) read one meaning from the signed bytes.
//!
//! # Rules
//! The profile is I-JSON (RFC 7493), which RFC 7515 §5.2 and RFC 7519 §7.2 let a JWS/JWT
//! verifier enforce by refusing what it cannot read unambiguously:
//! - **Duplicate member names** are refused in every object, at any depth (objects inside
//!   objects and arrays included). Names are compared after escape processing, so
//!   `"ten\u0061nt"` duplicates `"tenant"`. (Many parsers keep the last value, some the first,
//!   some refuse: a duplicated `tenant` could be read as two different tenants.)
//! - **Numbers** must be integers within ±(2^53 − 1) (I-JSON §2.2: the range every JSON
//!   implementation, JavaScript's included, reads exactly). Fractions, exponents (`1e3`,
//!   `1.0`) and `-0` are refused, whatever their value: no field of the header or the claims is
//!   fractional, and `1e3` is an integer to some parsers and a float to others.
//! - **Strings and names** must not contain Unicode noncharacters (U+FDD0–U+FDEF and the last
//!   two code points of every plane; I-JSON §2.1).
//! - Refused by serde_json already (each covered by a test here): text that is not UTF-8, a
//!   byte-order mark (RFC 8259 §8.1 lets parsers either ignore or refuse it, so they differ),
//!   lone surrogate escapes (`"\ud800"`), raw control characters in strings, data after the
//!   value (`{} {}`), trailing commas, numbers beyond the `f64` range (`1e400`), nesting deeper
//!   than 128.
//! - Accepted, because every parser reads them the same way: whitespace around and between
//!   tokens, string escapes (`\u0061`, `\/`), member order.
//!
//! # Errors
//! [`StrictJsonError`] names the offending key or number and where it is, as a path from the
//! root (`$.egress[2]`); syntax errors carry serde_json's line and column.
//!
//! # Cost
//! One pass over the bytes building a [`serde_json::Value`] (what the verifier needs next
//! anyway), plus one map probe per member for the duplicate check. Nothing is allocated for
//! paths unless there is an error.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::fmt;

/// The largest integer magnitude accepted: 2^53 − 1 (I-JSON §2.2).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why bytes are not strict JSON (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    /// A member name appears twice in one object.
    #[error("duplicate key `{key}` in the object at {path}")]
    DuplicateKey {
        /// The name (after escape processing).
        key: String,
        /// Path of the object holding it, e.g. `$.egress[0]`.
        path: String,
    },
    /// A number that is not an integer within ±(2^53 − 1).
    #[error(
        "number {number} at {path}: only integers within ±(2^53 - 1) are accepted (RFC 7493 I-JSON)"
    )]
    Number {
        /// The number as read.
        number: String,
        /// Where it is.
        path: String,
    },
    /// A Unicode noncharacter in a string or a member name.
    #[error("noncharacter U+{code:04X} in a string at {path} (RFC 7493 I-JSON)")]
    Noncharacter {
        /// The code point.
        code: u32,
        /// Where it is (for a member name: the member's path).
        path: String,
    },
    /// The text starts with a UTF-8 byte-order mark.
    #[error("byte-order mark before the JSON text")]
    ByteOrderMark,
    /// Not JSON at all, or refused by serde_json (see the module docs); with line and column.
    #[error("{0}")]
    Syntax(String),
}

/// Parses `bytes` as one strict JSON value (see the module docs).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(StrictJsonError::ByteOrderMark);
    }
    let first = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict {
        path: Path::Root,
        first: &first,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| {
        first
            .into_inner()
            .unwrap_or_else(|| StrictJsonError::Syntax(e.to_string()))
    })
}

/// Where a value sits, as a chain of borrowed links up to the root: building it costs nothing;
/// it is rendered only for an error.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => f.write_str("$"),
            Path::Index(up, i) => write!(f, "{up}[{i}]"),
            Path::Key(up, k) => {
                let plain = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if plain {
                    write!(f, "{up}.{k}")
                } else {
                    // JSON string syntax keeps odd names (dots, quotes, controls) unambiguous.
                    let quoted = serde_json::to_string(k).map_err(|_| fmt::Error)?;
                    write!(f, "{up}[{quoted}]")
                }
            }
        }
    }
}

/// The visitor: builds a [`Value`] and records the first strictness error in `first` (serde's
/// error type only carries a message; the caller gets the structured error back from here).
struct Strict<'a> {
    path: Path<'a>,
    first: &'a RefCell<Option<StrictJsonError>>,
}

impl Strict<'_> {
    fn fail<E: de::Error>(&self, e: StrictJsonError) -> E {
        let err = E::custom(&e);
        self.first.borrow_mut().get_or_insert(e);
        err
    }

    fn check_chars<E: de::Error>(&self, s: &str, path: &Path<'_>) -> Result<(), E> {
        match s.chars().find(|&c| is_noncharacter(c)) {
            None => Ok(()),
            Some(c) => Err(self.fail(StrictJsonError::Noncharacter {
                code: u32::from(c),
                path: path.to_string(),
            })),
        }
    }

    fn number<E: de::Error>(&self, number: String) -> E {
        self.fail(StrictJsonError::Number {
            number,
            path: self.path.to_string(),
        })
    }
}

/// U+FDD0..=U+FDEF and U+xxFFFE / U+xxFFFF of every plane.
fn is_noncharacter(c: char) -> bool {
    let c = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&c) || c & 0xFFFE == 0xFFFE
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        if n > MAX_SAFE_INTEGER {
            return Err(self.number(n.to_string()));
        }
        Ok(Value::from(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        if n.unsigned_abs() > MAX_SAFE_INTEGER {
            return Err(self.number(n.to_string()));
        }
        Ok(Value::from(n))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        // serde_json hands over as f64 every number written with a fraction or an exponent, `-0`,
        // and integers beyond 64 bits.
        Err(self.number(format!("{n:?}")))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.check_chars(s, &self.path)?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.check_chars(&s, &self.path)?;
        Ok(Value::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        loop {
            let item = Strict {
                path: Path::Index(&self.path, out.len()),
                first: self.first,
            };
            match seq.next_element_seed(item)? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let member = Path::Key(&self.path, &key);
            self.check_chars(&key, &member)?;
            if out.contains_key(&key) {
                return Err(self.fail(StrictJsonError::DuplicateKey {
                    key,
                    path: self.path.to_string(),
                }));
            }
            let value = map.next_value_seed(Strict {
                path: member,
                first: self.first,
            })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strict(s: &str) -> Result<Value, StrictJsonError> {
        parse_strict(s.as_bytes())
    }

    fn syntax(s: &[u8]) -> String {
        match parse_strict(s) {
            Err(StrictJsonError::Syntax(m)) => m,
            other => panic!("{s:?}: expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn canonical_json_is_read_like_serde_json_reads_it() {
        let text = r#" { "tenant" : "acme", "n": [1, -2, 0, 9007199254740991, true, null, {"a": {}}],
                        "esc": "\u0061\/\"" } "#;
        let v = strict(text).expect("strict");
        assert_eq!(v, serde_json::from_str::<Value>(text).expect("serde"));
        assert_eq!(v["esc"], "a/\"");
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_depth_with_their_path() {
        let cases = [
            (r#"{"tenant":"acme","tenant":"evil"}"#, "tenant", "$"),
            (r#"{"tenant":"acme","ten\u0061nt":"evil"}"#, "tenant", "$"),
            (r#"{"limits":{"a":1,"b":2,"a":1}}"#, "a", "$.limits"),
            (
                r#"{"egress":[{"host":"a"},{"host":"b","protocol":"tcp","host":"c"}]}"#,
                "host",
                "$.egress[1]",
            ),
            (r#"[[{"x":[{"k":1,"k":1}]}]]"#, "k", "$[0][0].x[0]"),
            (r#"{"a.b":{"":1,"":2}}"#, "", r#"$["a.b"]"#),
        ];
        for (text, key, path) in cases {
            assert!(serde_json::from_str::<Value>(text).is_ok(), "{text}");
            let e = strict(text).expect_err(text);
            assert_eq!(
                e,
                StrictJsonError::DuplicateKey {
                    key: key.into(),
                    path: path.into()
                },
                "{text}"
            );
            assert!(e.to_string().contains("duplicate key"), "{e}");
        }
    }

    #[test]
    fn numbers_must_be_interoperable_integers() {
        for ok in ["0", "-1", "9007199254740991", "-9007199254740991"] {
            assert!(strict(ok).is_ok(), "{ok}");
        }
        for (bad, shown) in [
            ("9007199254740992", "9007199254740992"),
            ("-9007199254740992", "-9007199254740992"),
            ("18446744073709551616", "1.8446744073709552e19"),
            ("1.0", "1.0"),
            ("1e3", "1000.0"),
            ("-0", "-0.0"),
            ("0.5", "0.5"),
        ] {
            let e = strict(&format!("{{\"limits\":{{\"n\":{bad}}}}}")).expect_err(bad);
            assert_eq!(
                e,
                StrictJsonError::Number {
                    number: shown.into(),
                    path: "$.limits.n".into()
                }
            );
        }
        assert!(syntax(b"1e400").contains("number out of range"));
    }

    #[test]
    fn noncharacters_are_refused_in_strings_and_names() {
        for (text, code, path) in [
            ("[\"a\\ufffe\"]", 0xFFFE, "$[0]"),
            ("{\"k\":\"\u{FDD0}\"}", 0xFDD0, "$.k"),
            ("{\"\\udbff\\udfff\":1}", 0x10FFFF, "$[\"\u{10FFFF}\"]"),
        ] {
            assert_eq!(
                strict(text),
                Err(StrictJsonError::Noncharacter {
                    code,
                    path: path.into()
                }),
                "{text}"
            );
        }
        // Ordinary non-ASCII text and surrogate pairs are fine.
        assert_eq!(
            strict("\"\\ud83d\\ude00 caf\u{e9}\""),
            Ok(json!("\u{1F600} caf\u{e9}"))
        );
    }

    #[test]
    fn what_serde_json_refuses_stays_refused() {
        assert_eq!(
            parse_strict(b"\xEF\xBB\xBF{}"),
            Err(StrictJsonError::ByteOrderMark)
        );
        assert!(syntax(b"{\"tenant\":\"caf\xe9\"}").contains("invalid unicode code point"));
        assert!(syntax(b"\"\\ud800\"").contains("hex escape"));
        assert!(syntax(b"\"\\udc00x\"").contains("surrogate"));
        assert!(syntax(b"\"a\x01\"").contains("control character"));
        assert!(syntax(b"{} {}").contains("trailing characters"));
        assert!(syntax(b"{\"a\":1}x").contains("trailing characters"));
        assert!(syntax(b"[1,]").contains("trailing comma"));
        assert!(syntax(b"").contains("EOF"));
        assert!(syntax(b"{'a':1}").contains("key must be a string"));
        assert!(syntax(b"NaN").contains("expected value"));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(syntax(deep.as_bytes()).contains("recursion limit"));
        assert!(strict(&format!("{}{}", "[".repeat(100), "]".repeat(100))).is_ok());
        assert_eq!(strict(" \n{}\t\r\n "), Ok(json!({})));
    }
}
