//! The Prometheus text format, read: one sample per line. Only what `snas drops` needs of a
//! proxy's `/metrics` (names, labels with escapes, the value); comments are skipped.

use std::collections::BTreeMap;

/// One Prometheus sample: metric name, labels, value.
pub(super) type Sample = (String, BTreeMap<String, String>, f64);

/// Parses one line of the Prometheus text format (comments and blank lines give `None`).
pub(super) fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next()? {
                            (_, '"') => break,
                            (_, '\\') => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                other => val.push(other),
                            },
                            (_, c) => val.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), val);
                }
                c => key.push(c),
            }
        }
        rest = &r[end?..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples_with_escaped_labels_parse() {
        let (n, l, v) =
            parse_sample(r#"snas_proxy_drops_total{reason="port_denied",job_key="a\"b"} 7"#)
                .unwrap();
        assert_eq!(n, "snas_proxy_drops_total");
        assert_eq!(l.get("reason").map(String::as_str), Some("port_denied"));
        assert_eq!(l.get("job_key").map(String::as_str), Some("a\"b"));
        assert_eq!(v, 7.0);
        let (n, l, v) = parse_sample("snas_proxy_flows 3").unwrap();
        assert_eq!((n.as_str(), l.len(), v), ("snas_proxy_flows", 0, 3.0));
        assert!(parse_sample("# HELP x y").is_none());
        assert!(parse_sample("broken{reason=x} 1").is_none());
    }
}
