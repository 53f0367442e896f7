//! The config loader on arbitrary bytes as one YAML file: never panics, stays within its
//! limits (libFuzzer's timeout and memory cap catch a runaway parse), and a config it
//! accepts is consistent with itself.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use nodemesh::config::{Config, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let files = [(PathBuf::from("fuzz.yaml"), text)];
    match Config::load_documents(&files, &LoadOptions::default()) {
        Ok(config) => {
            for service in config.services() {
                let key = service.key();
                let found = config.service_by_key(&key).map(|s| s.key());
                assert_eq!(found.as_deref(), Some(key.as_str()), "service index");
                if let Some(ip) = service.cluster_ip {
                    let owner = config.service_by_cluster_ip(ip).map(|s| s.key());
                    assert_eq!(owner.as_deref(), Some(key.as_str()), "cluster IP index");
                }
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a rejection without a reason");
            for error in &errors.0 {
                assert_eq!(error.file, files[0].0, "an error naming another file");
            }
        }
    }
});
