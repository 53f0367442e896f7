//! What a load refuses to read (the [`Limits`]) and the entries it cannot read, through both
//! entry points: a directory and documents held in memory.

use std::os::unix::fs::symlink;
use std::path::PathBuf;

use super::test_support::TestDir;
use super::{Config, ConfigErrors, Limits, LoadOptions};

fn namespace(name: &str) -> String {
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

/// `files` loaded from memory and from a directory: both must give the same answer.
fn load_both(files: &[(&str, &str)], limits: &Limits) -> Result<Config, Vec<String>> {
    let opts = LoadOptions {
        limits: *limits,
        ..LoadOptions::default()
    };
    let dir = TestDir::new();
    for (name, text) in files {
        dir.write(name, text);
    }
    let from_dir = Config::load_dir(dir.path(), &opts).map_err(|e| relative(e, &dir));
    let in_memory: Vec<_> = files
        .iter()
        .map(|(name, text)| (PathBuf::from(name), text.to_string()))
        .collect();
    let in_memory = Config::load_documents(&in_memory, &opts).map_err(|e| display(&e));
    match (&from_dir, &in_memory) {
        (Ok(a), Ok(b)) => assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        ),
        (a, b) => assert_eq!(a.as_ref().err(), b.as_ref().err()),
    }
    from_dir
}

fn display(errors: &ConfigErrors) -> Vec<String> {
    errors.0.iter().map(ToString::to_string).collect()
}

/// The errors, with file names relative to `dir`.
fn relative(errors: ConfigErrors, dir: &TestDir) -> Vec<String> {
    let prefix = format!("{}/", dir.path().display());
    display(&errors)
        .into_iter()
        .map(|e| e.replacen(&prefix, "", 1))
        .collect()
}

#[test]
fn documents_in_memory_load_like_a_directory() {
    let routes = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                  metadata: {name: web, namespace: shop}\n\
                  spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}\n";
    let services = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec: {ports: [{port: 80, name: http}]}\n";
    let config = load_both(
        &[
            ("a.yaml", &namespace("shop")),
            ("b.yaml", services),
            ("c.yaml", routes),
        ],
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(config.routing().route_count(), 1);
    let errors = load_both(
        &[("a.yaml", "kind: ["), ("b.yaml", "[]")],
        &Limits::default(),
    );
    assert_eq!(errors.unwrap_err().len(), 2);
}

#[test]
fn refuses_files_beyond_the_size_limits() {
    let limits = Limits {
        file_bytes: 200,
        total_bytes: 300,
        ..Limits::default()
    };
    let padded = |name: &str, len: usize| {
        let doc = namespace(name);
        format!("{doc}#{}\n", "x".repeat(len - doc.len() - 2))
    };
    let errors = load_both(
        &[
            ("a.yaml", &padded("a", 150)),
            ("b.yaml", &padded("b", 201)),
            ("c.yaml", &padded("c", 150)),
            ("d.yaml", &padded("d", 60)),
            ("e.yaml", "not even: [ YAML"),
        ],
        &limits,
    )
    .unwrap_err();
    assert_eq!(
        errors,
        [
            "b.yaml: file larger than the limit of 200 bytes",
            "d.yaml: config files larger than the limit of 300 bytes together; stopped loading \
             at this file",
        ]
    );
    // At the limits exactly, all is well.
    let at_limits = [("a.yaml", padded("a", 200)), ("b.yaml", padded("b", 100))];
    let at_limits: Vec<_> = at_limits.iter().map(|(n, t)| (*n, t.as_str())).collect();
    assert_eq!(
        load_both(&at_limits, &limits).unwrap().namespaces().count(),
        2
    );
}

#[test]
fn refuses_more_objects_than_the_limit() {
    let limits = Limits {
        objects: 3,
        ..Limits::default()
    };
    let two = |a: &str, b: &str| namespace(a) + &namespace(b);
    let errors = load_both(
        &[("a.yaml", &two("a", "b")), ("b.yaml", &two("c", "d"))],
        &limits,
    )
    .unwrap_err();
    assert_eq!(
        errors,
        [
            "b.yaml: more than the limit of 3 objects in the config files together; stopped \
          loading at document 2 of this file"
        ]
    );
    let three = load_both(
        &[("a.yaml", &two("a", "b")), ("b.yaml", &namespace("c"))],
        &limits,
    );
    assert_eq!(three.unwrap().namespaces().count(), 3);
}

#[test]
fn refuses_deep_and_large_documents_naming_the_file() {
    let limits = Limits {
        document_nodes: 100,
        ..Limits::default()
    };
    let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let large = format!("{}---\n[{}]\n", namespace("a"), vec!["0"; 100].join(", "));
    let errors = load_both(&[("deep.yaml", &deep), ("large.yaml", &large)], &limits).unwrap_err();
    let [deep, large] = &errors[..] else {
        panic!("{errors:?}")
    };
    assert!(
        deep.starts_with(
            "deep.yaml: document nested deeper than the limit of 64 levels of mappings and \
             sequences at line 1"
        ),
        "{deep}"
    );
    assert!(
        large.starts_with("large.yaml: document larger than the limit of 100 YAML nodes"),
        "{large}"
    );
}

#[test]
fn an_entry_that_cannot_be_read_is_an_error_naming_it() {
    let dir = TestDir::new();
    dir.write("good.yaml", &namespace("shop"));
    symlink("loop.yaml", dir.path().join("loop.yaml")).unwrap();
    let errors = Config::load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert_eq!(
        relative(errors, &dir),
        ["loop.yaml: cannot follow symbolic link: Too many levels of symbolic links (os error 40)"]
    );
}

#[test]
fn a_long_list_of_errors_is_cut_short() {
    let bad: String = (0..150).map(|i| namespace(&format!("Bad{i}"))).collect();
    let errors = load_both(&[("bad.yaml", &bad)], &Limits::default()).unwrap_err();
    assert_eq!(errors.len(), 150);
    let dir = TestDir::new();
    dir.write("bad.yaml", &bad);
    let shown = Config::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(shown.lines().count(), 101, "{shown}");
    assert!(shown.ends_with("\n… and 50 more problems"), "{shown}");
}
