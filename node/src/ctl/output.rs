//! nodectl's output formats, as kubectl's `-o`: `table` (default), `wide` (more
//! columns), `json`, `yaml` and `name` (`vm/NAME`, for scripts).

use clap::ValueEnum;
use comfy_table::{presets::NOTHING, Cell, ContentArrangement, Table};
use serde_json::Value;

/// `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// Aligned columns, with more of them.
    Wide,
    /// Pretty JSON (watch: one event object per line).
    Json,
    /// YAML (watch: one document per event).
    Yaml,
    /// `kind/name` per object.
    Name,
}

impl Output {
    /// Whether the output is a table (`table` or `wide`).
    pub fn tabular(self) -> bool {
        matches!(self, Output::Table | Output::Wide)
    }
}

/// A JSON value as a table cell: `-` for null, `yes`/`no` for booleans.
pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// The rows of a table from a JSON array of objects: one cell per field, `-` for a
/// missing field, except the last field (a message or an error), which is empty when
/// missing.
pub fn rows(v: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    let Some((last, first)) = fields.split_last() else {
        return Vec::new();
    };
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let mut row: Vec<String> = first.iter().map(|f| s(&x[*f])).collect();
                    row.push(x[*last].as_str().unwrap_or("").to_string());
                    row
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Renders rows under headers with aligned columns (kubectl's look: no borders, two
/// spaces between columns).
pub fn table_text(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().map(|h| Cell::new(*h)));
    for r in rows {
        t.add_row(r.iter().map(Cell::new));
    }
    // comfy-table pads each cell with one space on both sides: trim the outer ones.
    t.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(&l).trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints a table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    println!("{}", table_text(headers, rows));
}

/// YAML text of a value (JSON as a fallback that cannot fail).
pub fn yaml(v: &Value) -> String {
    serde_norway::to_string(v).unwrap_or_else(|_| format!("{v:#}\n"))
}

/// Prints `v` as JSON, YAML or `kind/name` lines; false for the tabular formats, which
/// the caller prints itself.
pub fn print_structured(o: Output, kind: &str, v: &Value) -> bool {
    match o {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", yaml(v)),
        Output::Name => {
            let items = match v {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            for i in items {
                let name = i["name"]
                    .as_str()
                    .or(i["version"].as_str())
                    .or(i["startedAt"].as_str())
                    .unwrap_or("-");
                println!("{kind}/{name}");
            }
        }
        Output::Table | Output::Wide => return false,
    }
    true
}

/// Prints one watch event in a structured format; false for the tabular formats.
pub fn print_event(o: Output, kind: &str, ev: &Value) -> bool {
    match o {
        Output::Json => println!("{}", serde_json::to_string(ev).unwrap_or_default()),
        Output::Yaml => print!("---\n{}", yaml(ev)),
        Output::Name => {
            let obj = &ev["object"];
            let name = obj["name"]
                .as_str()
                .or(obj["startedAt"].as_str())
                .unwrap_or("status");
            println!("{kind}/{name}");
        }
        Output::Table | Output::Wide => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_like_kubectl() {
        let t = table_text(
            &["NAME", "PHASE"],
            &[
                vec!["web".into(), "Running".into()],
                vec!["database".into(), "-".into()],
            ],
        );
        assert_eq!(t, "NAME      PHASE\nweb       Running\ndatabase  -");
    }
}
