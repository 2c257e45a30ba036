//! The module graph: arrows point one way. `kernels` is a leaf (it knows
//! slices and shapes, not models); the library and the CLI have no import
//! cycles between their top-level modules. Read from the sources: every
//! `crate::<module>` path outside a file's unit tests counts as an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// module -> the top-level modules it names, for the crate at `src`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                files.push(e.unwrap().path());
            }
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = p.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        // a file's own unit tests may reach anywhere
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let deps = graph.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    let mods: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| mods.contains(d));
    }
    graph
}

/// A cycle through `start`, if any: the path start -> … -> start.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((m, path)) = stack.pop() {
        for d in graph.get(&m).into_iter().flatten() {
            if d == start {
                let mut p = path.clone();
                p.push(d.clone());
                return Some(p);
            }
            if seen.insert(d.clone()) {
                let mut p = path.clone();
                p.push(d.clone());
                stack.push((d.clone(), p));
            }
        }
    }
    None
}

fn assert_acyclic(src: &Path) {
    let g = imports(src);
    assert!(g.len() > 3, "read the modules of {}", src.display());
    for m in g.keys() {
        if let Some(c) = cycle(&g, m) {
            panic!("{}: import cycle {}", src.display(), c.join(" -> "));
        }
    }
}

#[test]
fn the_library_has_no_import_cycles_and_kernels_is_a_leaf() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = imports(&src);
    assert!(
        g["kernels"].is_empty(),
        "kernels imports {:?}",
        g["kernels"]
    );
    // the executors know ops, not the model
    for m in ["model", "attention", "ffn", "formats"] {
        assert!(!g["exec"].contains(m), "exec imports {m}");
    }
    assert_acyclic(&src);
}

#[test]
fn the_cli_has_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../attend-cli/src");
    assert_acyclic(&src);
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    // the checker itself: a -> b -> c -> a
    let mut g = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(a.to_string())
            .or_insert_with(BTreeSet::new)
            .insert(b.to_string());
    }
    assert_eq!(cycle(&g, "a").unwrap(), ["a", "b", "c", "a"]);
    assert!(cycle(&g, "d").is_none());
}
