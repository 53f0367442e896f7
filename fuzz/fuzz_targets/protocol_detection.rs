//! Protocol detection on arbitrary first bytes: never panics, and a
//! decision taken on a prefix is the one taken on the whole (so bytes that
//! arrive later cannot turn an HTTP connection into an opaque one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::proxy::detect::{classify, classify_declared, Detected};

fuzz_target!(|data: &[u8]| {
    let rules: [(fn(&[u8], bool) -> Option<Detected>, bool); 2] =
        [(classify, false), (classify_declared, true)];
    for (rule, declared) in rules {
        let whole = rule(data, true);
        assert!(whole.is_some(), "no decision once nothing more will come");
        if declared {
            assert_ne!(
                whole,
                Some(Detected::Opaque),
                "a declared HTTP port is never opaque"
            );
        }
        for cut in 0..data.len() {
            if let Some(early) = rule(&data[..cut], false) {
                assert_eq!(Some(early), rule(data, false), "decided on {cut} bytes");
                assert_eq!(Some(early), whole);
            }
        }
    }
});
