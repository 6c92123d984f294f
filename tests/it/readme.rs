//! The README's rule table, checked against the code: a sentence of the README is a promise.
//!
//! The table has one row per rule of `docs/SPEC.md`, naming the files and functions that
//! implement it and the tests that prove it, each in backticks: a path (from the workspace
//! root), then the names defined in that file. These tests read files only (std, no services):
//! every file named exists and defines every name given for it (`fn name`, or `CREATE … name` in
//! a migration); every rule of SPEC has a row; and `docs/SPEC.md` is the copy of the SPEC beside
//! the repository, when there is one. A row whose cells say `not yet` names nothing to check.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The header of the rule table in README.md.
const HEADER: [&str; 4] = ["rule", "what it says", "implemented in", "proved by"];

/// What a row says for a rule that is not built yet.
const NOT_YET: &str = "not yet";

/// The workspace root: `CARGO_MANIFEST_DIR` is `tests/`.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One file of a cell, with the names the row says it defines.
#[derive(Debug)]
struct Cited {
    path: String,
    names: Vec<String>,
}

/// One row of the rule table.
#[derive(Debug)]
struct Row {
    rule: String,
    implemented: Vec<Cited>,
    proved: Vec<Cited>,
    not_yet: bool,
}

/// The cells of a Markdown table line (`| a | b |` -> `["a", "b"]`).
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

/// The code spans of a cell, in order.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

fn is_path(span: &str) -> bool {
    span.contains('/') || span.ends_with(".rs") || span.ends_with(".sql")
}

fn is_identifier(span: &str) -> bool {
    let mut chars = span.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A cell's files and names: each path starts a file, each identifier after it is a name the
/// file defines.
fn cited(rule: &str, cell: &str) -> Result<Vec<Cited>, String> {
    let mut files: Vec<Cited> = Vec::new();
    for span in code_spans(cell) {
        if is_path(span) {
            files.push(Cited {
                path: span.to_string(),
                names: Vec::new(),
            });
        } else if !is_identifier(span) {
            return Err(format!(
                "{rule}: `{span}` is neither a path nor a name (write prose without backticks)"
            ));
        } else if let Some(file) = files.last_mut() {
            file.names.push(span.to_string());
        } else {
            return Err(format!("{rule}: `{span}` comes before any file"));
        }
    }
    Ok(files)
}

/// The rule table of README.md.
fn rule_table(readme: &str) -> Result<Vec<Row>, String> {
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.starts_with('|') || cells(l) != HEADER);
    if lines.next().is_none() {
        return Err(format!("README.md has no table headed {HEADER:?}"));
    }
    lines.next(); // |---|---|...
    let mut rows = Vec::new();
    for line in lines.take_while(|l| l.starts_with('|')) {
        let c = cells(line);
        let [rule, _says, implemented, proved] = c.as_slice() else {
            return Err(format!("a row without 4 cells: {line}"));
        };
        let not_yet = [implemented, proved]
            .iter()
            .filter(|c| c.contains(NOT_YET))
            .count();
        if not_yet == 1 {
            return Err(format!(
                "{rule}: `{NOT_YET}` in one of its two last cells only"
            ));
        }
        rows.push(Row {
            rule: rule.clone(),
            implemented: cited(rule, implemented)?,
            proved: cited(rule, proved)?,
            not_yet: not_yet == 2,
        });
    }
    Ok(rows)
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `name` occurs in `text` as a whole word at byte `at`.
fn whole_word(text: &str, at: usize, name: &str) -> bool {
    let before = text[..at].chars().next_back();
    let after = text[at + name.len()..].chars().next();
    !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
}

/// Whether Rust source `text` defines `name`: `fn name` (`pub async fn`... included), or an
/// item of that name (`struct`, `enum`, `trait`, `type`, `const`, `static`, `mod`).
fn rust_defines(text: &str, name: &str) -> bool {
    const ITEMS: [&str; 8] = [
        "fn", "struct", "enum", "trait", "type", "const", "static", "mod",
    ];
    text.match_indices(name).any(|(at, _)| {
        if !whole_word(text, at, name) {
            return false;
        }
        let before = text[..at].trim_end();
        // The keyword and the name on one line, with only spaces between them.
        let gap = &text[before.len()..at];
        if gap.is_empty() || gap.contains('\n') {
            return false;
        }
        ITEMS.iter().any(|item| {
            before
                .strip_suffix(item)
                .is_some_and(|rest| !rest.chars().next_back().is_some_and(is_ident_char))
        })
    })
}

/// Whether a migration creates `name` (a function, trigger, index, table...).
fn sql_defines(text: &str, name: &str) -> bool {
    text.lines().any(|line| {
        line.contains("CREATE")
            && line
                .match_indices(name)
                .any(|(at, _)| whole_word(line, at, name))
    })
}

/// What is wrong with one cited file, if anything.
fn check(root: &Path, rule: &str, what: &str, file: &Cited, problems: &mut Vec<String>) {
    let path = root.join(&file.path);
    let Ok(text) = fs::read_to_string(&path) else {
        problems.push(format!("{rule} ({what}): no file {}", file.path));
        return;
    };
    if file.names.is_empty() {
        problems.push(format!(
            "{rule} ({what}): {} names nothing in it",
            file.path
        ));
    }
    for name in &file.names {
        let defined = if file.path.ends_with(".sql") {
            sql_defines(&text, name)
        } else {
            rust_defines(&text, name)
        };
        if !defined {
            problems.push(format!(
                "{rule} ({what}): {} does not define {name}",
                file.path
            ));
        }
    }
}

/// The rule IDs SPEC defines: list items that start with one (`- L1 A message…`, `- SL …`).
fn spec_rules(spec: &str) -> BTreeSet<String> {
    spec.lines()
        .filter_map(|l| l.strip_prefix("- "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| {
            id.len() <= 4
                && id.starts_with(|c: char| c.is_ascii_uppercase())
                && id
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_file_and_function_the_rule_table_names_exists() {
    let root = root();
    let rows = rule_table(&read(&root.join("README.md"))).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rows.len() >= 20,
        "the rule table has {} rows: {rows:?}",
        rows.len()
    );
    let mut problems = Vec::new();
    for row in rows.iter().filter(|r| !r.not_yet) {
        if row.implemented.is_empty() {
            problems.push(format!("{}: no file implements it", row.rule));
        }
        if row.proved.is_empty() {
            problems.push(format!("{}: no test proves it", row.rule));
        }
        for file in &row.implemented {
            check(&root, &row.rule, "implemented in", file, &mut problems);
        }
        for file in &row.proved {
            check(&root, &row.rule, "proved by", file, &mut problems);
        }
    }
    assert!(
        problems.is_empty(),
        "the README's rule table promises what the code does not hold:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_rule_of_the_spec_has_a_row() {
    let root = root();
    let spec = read(&root.join("docs/SPEC.md"));
    let defined = spec_rules(&spec);
    assert!(
        defined.contains("L1") && defined.contains("D1"),
        "rule IDs not found in docs/SPEC.md: {defined:?}"
    );
    let rows = rule_table(&read(&root.join("README.md"))).unwrap_or_else(|e| panic!("{e}"));
    let mut in_table = BTreeSet::new();
    for row in &rows {
        assert!(
            in_table.insert(row.rule.clone()),
            "{} has two rows",
            row.rule
        );
        // A row is a rule SPEC defines, or a section SPEC names by letter (`## States (S)`).
        assert!(
            defined.contains(&row.rule) || spec.contains(&format!("({})", row.rule)),
            "{} is not a rule of docs/SPEC.md",
            row.rule
        );
    }
    let missing: Vec<&String> = defined.difference(&in_table).collect();
    assert!(
        missing.is_empty(),
        "rules of docs/SPEC.md without a row in the README: {missing:?}"
    );
}

#[test]
fn docs_spec_is_the_spec_beside_the_repository() {
    let root = root();
    let Some(beside) = root.parent().map(|p| p.join("shared/SPEC.md")) else {
        println!("skipped: the workspace root has no parent");
        return;
    };
    if !beside.is_file() {
        println!(
            "skipped: no {} beside the repository to compare docs/SPEC.md with",
            beside.display()
        );
        return;
    }
    assert!(
        read(&root.join("docs/SPEC.md")) == read(&beside),
        "docs/SPEC.md differs from {}: copy it again",
        beside.display()
    );
}

#[test]
fn the_table_parser_reads_paths_names_and_prose() {
    let readme = "x\n\n| rule | what it says | implemented in | proved by |\n|---|---|---|---|\n\
        | L1 | `a` b | `x/y.rs` `f`, `g`; `z.sql` `t` | `tests/it/p.rs` `t1` |\n\
        | D10 | c | not yet (issue 23) | not yet (issue 23) |\n\nafter\n";
    let rows = rule_table(readme).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].rule, "L1");
    assert_eq!(rows[0].implemented.len(), 2);
    assert_eq!(rows[0].implemented[0].path, "x/y.rs");
    assert_eq!(rows[0].implemented[0].names, ["f", "g"]);
    assert_eq!(rows[0].implemented[1].names, ["t"]);
    assert_eq!(rows[0].proved[0].names, ["t1"]);
    assert!(!rows[0].not_yet && rows[1].not_yet);
    assert!(rust_defines("pub async fn pass(\n", "pass"));
    assert!(rust_defines("    fn places<T>(x: T)", "places"));
    assert!(rust_defines(
        "pub enum ConversationState {",
        "ConversationState"
    ));
    assert!(!rust_defines("fn pass_for(", "pass"));
    assert!(!rust_defines("let pass = 1; // fn\npass(", "pass"));
    assert!(!rust_defines("fnord pass()", "pass"));
    assert!(sql_defines(
        "CREATE UNIQUE INDEX conversations_one_open_per_customer\n",
        "conversations_one_open_per_customer"
    ));
    assert!(!sql_defines("SELECT offers_check(", "offers_check"));
    let spec = "- L1 A message\n- D10 Weight\n- SL Service\n- What a decline does\n  - L2 nested\n";
    assert_eq!(
        spec_rules(spec).into_iter().collect::<Vec<_>>(),
        ["D10", "L1", "SL"]
    );
    assert!(cited("L1", "`x.rs` `not a name`").is_err());
    assert!(cited("L1", "`f` `x.rs`").is_err());
}
