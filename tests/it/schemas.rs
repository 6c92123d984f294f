//! The JSON Schemas in `schemas/` are the Rust types' own: a change to a wire type that is
//! not written to `schemas/` (with `cargo run -p firstline -- schemas`) fails here.

#[test]
fn schemas_on_disk_equal_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let generated = firstline_shared::wire::all_schemas();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".schema.json"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = generated
        .iter()
        .map(|(n, _)| format!("{n}.schema.json"))
        .collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "one schema file per wire message, and no stale ones"
    );
    for (name, schema) in generated {
        let path = dir.join(format!("{name}.schema.json"));
        let text = std::fs::read_to_string(&path).unwrap();
        let disk: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            disk,
            serde_json::to_value(&schema).unwrap(),
            "{} is stale: run `cargo run -p firstline -- schemas`",
            path.display()
        );
    }
}
