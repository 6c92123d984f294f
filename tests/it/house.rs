//! The layout the project keeps (issue: the house): workers talk over NATS only, so no worker
//! crate depends on another (the all-in-one `firstline` binary excepted), and no source file of
//! `shared/` or `workers/` grows into a room nobody can find their way in. Files only, no services.

use std::fs;
use std::path::{Path, PathBuf};

/// The longest a source file of `shared/` or `workers/` may be.
const MOST_LINES: usize = 600;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_worker_crate_depends_on_another_worker() {
    let workers = root().join("workers");
    let mut crates: Vec<(String, String)> = Vec::new();
    for entry in fs::read_dir(&workers).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let name = manifest
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("{} has no name", dir.display()));
        crates.push((name, manifest));
    }
    assert!(crates.len() >= 5, "the workers are found: {crates:?}");
    let names: Vec<&str> = crates.iter().map(|(n, _)| n.as_str()).collect();
    for (name, manifest) in &crates {
        if name == "firstline" {
            continue;
        }
        for other in names.iter().filter(|o| *o != name && **o != "firstline") {
            let dependency = manifest.lines().any(|l| {
                l.trim_start().starts_with(&format!("{other}."))
                    || l.trim_start().starts_with(&format!("{other} "))
            });
            assert!(
                !dependency,
                "{name} depends on the worker {other}: share through shared/ instead"
            );
        }
    }
}

#[test]
fn no_source_file_of_shared_or_workers_is_above_the_limit() {
    let mut files = Vec::new();
    rust_files(&root().join("shared"), &mut files);
    rust_files(&root().join("workers"), &mut files);
    assert!(files.len() > 20, "the sources are found");
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = fs::read_to_string(f).unwrap().lines().count();
            (lines > MOST_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these (at most {MOST_LINES} lines): {long:?}"
    );
}
