//! The module layering of ARCHITECTURE.md, checked: each module of the
//! agent imports only the modules below it (test code aside), so there is no
//! import cycle and the leaves stay leaves.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Module -> the modules of the crate it may import.
const ALLOWED: &[(&str, &[&str])] = &[
    ("sys", &[]),
    ("telemetry", &[]),
    ("config", &[]),
    ("plan", &["config", "sys"]),
    ("coord", &["plan"]),
    ("datapath", &["plan", "sys", "telemetry"]),
    (
        "control",
        &["config", "plan", "coord", "datapath", "sys", "telemetry"],
    ),
    ("l7", &["config", "sys", "telemetry"]),
    ("api", &["config", "control"]),
    ("cli", &["api", "config", "control", "datapath"]),
    (
        "agent",
        &[
            "api",
            "config",
            "control",
            "coord",
            "datapath",
            "l7",
            "plan",
            "sys",
            "telemetry",
        ],
    ),
    // The simulation runs the agent's cluster glue and the control loop
    // against the store's and the data path's in-memory stand-ins; only
    // tests and `sluice-sim` build it.
    (
        "sim",
        &["agent", "config", "control", "coord", "datapath", "plan"],
    ),
];

fn sources(module: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut out = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).expect("module directory").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    assert!(!out.is_empty(), "module `{module}` has no sources");
    out
}

/// The text of a source file without its test-only parts: a
/// `#[cfg(test)]` module declared with `;` is one line, one written inline
/// (the unit tests, last in a file) runs to the end.
fn non_test(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if l.trim() == "#[cfg(test)]" {
            while lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("#["))
            {
                lines.next();
            }
            match lines.next() {
                Some(item) if item.trim_end().ends_with(';') => continue,
                _ => break,
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// The crate's top-level modules that `text` names as `crate::<module>`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(body) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}};`: the names at depth 0.
            let mut depth = 0;
            let mut name = String::new();
            let mut taking = true;
            for ch in body.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(std::mem::take(&mut name));
                        taking = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && taking {
                    if ch.is_alphanumeric() || ch == '_' {
                        name.push(ch);
                    } else if !name.is_empty() {
                        taking = false;
                    }
                }
            }
            found.insert(name);
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found.remove("");
    found
}

#[test]
fn modules_import_only_the_layers_below() {
    let mut wrong = BTreeMap::new();
    for (module, allowed) in ALLOWED {
        for file in sources(module) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Test-only files: the fakes and the unit tests (and a unit
            // test module's own children, in its `tests/` folder).
            let in_tests = file
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|d| d == "tests");
            if name == "tests.rs" || name == "fake.rs" || in_tests {
                continue;
            }
            let text = fs::read_to_string(&file).expect("source");
            for import in imports(&non_test(&text)) {
                if import != *module && !allowed.contains(&import.as_str()) {
                    wrong
                        .entry(format!("{module} -> {import}"))
                        .or_insert_with(Vec::new)
                        .push(file.display().to_string());
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering of ARCHITECTURE.md: {wrong:#?}"
    );
}

#[test]
fn the_import_reader_sees_nested_and_single_paths() {
    let text = "use crate::{\n    config::Config,\n    plan::{Group, Plan},\n    sys,\n};\nfn f() { crate::telemetry::x(); }\n#[cfg(test)]\nmod tests { use crate::agent; }\n";
    assert_eq!(
        imports(&non_test(text)),
        ["config", "plan", "sys", "telemetry"]
            .map(String::from)
            .into()
    );
}

/// ARCHITECTURE.md's "to change X, open Y" table is true: every file it
/// names exists and holds the item named beside it, so a file that is
/// split or renamed takes the table with it.
#[test]
fn the_to_change_table_names_files_that_hold_their_items() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let doc = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = doc
        .split("## To change X, open Y")
        .nth(1)
        .expect("ARCHITECTURE.md has a section \"To change X, open Y\"");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = 0;
    let mut wrong = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| what | `file` | `item` |` splits into ["", what, file, item, ""].
        let (Some(file), Some(item)) = (cells.get(2), cells.get(3)) else {
            continue;
        };
        let (Some(file), Some(item)) = (
            file.strip_prefix('`').and_then(|f| f.strip_suffix('`')),
            item.strip_prefix('`').and_then(|i| i.strip_suffix('`')),
        ) else {
            continue; // the header and the rule
        };
        rows += 1;
        match fs::read_to_string(root.join(file)) {
            Ok(text) if text.contains(item) => {}
            Ok(_) => wrong.push(format!("{file} does not hold `{item}`")),
            Err(e) => wrong.push(format!("{file}: {e}")),
        }
    }
    assert!(rows >= 10, "read only {rows} rows of the table");
    assert!(
        wrong.is_empty(),
        "ARCHITECTURE.md's table is wrong: {wrong:#?}"
    );
}
