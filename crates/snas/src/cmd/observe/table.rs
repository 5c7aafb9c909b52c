//! Printing rows for a person (aligned columns, human durations) or a machine (`--json`).

use std::time::SystemTime;

use serde_json::Value;

/// Human duration: `45s`, `3m05s`, `2h01m`, `0.4s`.
pub(super) fn human_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let t = s as u64;
    match t {
        0..=59 => format!("{t}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        _ => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
    }
}

/// Left-aligned columns separated by two spaces; numbers right-aligned.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..n)
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if numeric[i] {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if i + 1 < n {
                    l.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

pub(super) fn dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

pub(super) fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A row that `--json` prints as one object.
pub(super) trait JsonRow {
    fn to_json(&self) -> Value;
}

pub(super) fn print_json<T: JsonRow>(rows: &[T]) -> anyhow::Result<()> {
    let v = Value::Array(rows.iter().map(JsonRow::to_json).collect());
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_text_left_and_numbers_right() {
        let t = table(
            &["JOB", "N"],
            &[
                vec!["a".into(), "5".into()],
                vec!["long-name".into(), "120".into()],
            ],
        );
        assert_eq!(t, "JOB          N\na            5\nlong-name  120\n");
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human_secs(0.42), "0.4s");
        assert_eq!(human_secs(59.0), "59s");
        assert_eq!(human_secs(185.0), "3m05s");
        assert_eq!(human_secs(7260.0), "2h01m");
        assert_eq!(human_secs(-1.0), "-");
    }
}
