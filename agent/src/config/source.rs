//! Which entries of the config directory are config files, and reading them within limits.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A `*.yaml` / `*.yml` entry of the config directory.
pub(super) struct ConfigFile {
    pub path: PathBuf,
    /// Why it cannot be read (a symlink loop, a dangling symlink, no permission), if so.
    pub unreadable: Option<String>,
}

/// The config files of `dir` (not recursive, hidden entries skipped), in file name order.
///
/// Entries named like config files that cannot be inspected are listed with the reason, so
/// that the load reports them instead of silently going on without their objects; entries
/// that are not regular files (subdirectories, sockets, pipes) are skipped.
pub(super) fn config_files(dir: &Path) -> io::Result<Vec<ConfigFile>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."));
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if hidden || !yaml {
            continue;
        }
        // `metadata` follows symlinks: ConfigMap volumes expose files as links into `..data`.
        match fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => files.push(ConfigFile {
                path,
                unreadable: None,
            }),
            Ok(_) => {}
            Err(e) => {
                let symlink = fs::symlink_metadata(&path).is_ok_and(|m| m.is_symlink());
                let reason = if symlink {
                    format!("cannot follow symbolic link: {e}")
                } else {
                    format!("cannot read file: {e}")
                };
                files.push(ConfigFile {
                    path,
                    unreadable: Some(reason),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Why a config file was not read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadError {
    /// Larger than allowed.
    TooLarge,
    /// Unreadable, or not text.
    Failed(String),
}

/// The text of `path`, reading at most `max_bytes` of it.
pub(super) fn read_file(path: &Path, max_bytes: usize) -> Result<String, ReadError> {
    let failed = |e: io::Error| ReadError::Failed(format!("cannot read file: {e}"));
    let file = File::open(path).map_err(failed)?;
    let cap = u64::try_from(max_bytes).unwrap_or(u64::MAX);
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file at the limit from a larger one, even if it
    // grows while being read.
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() > max_bytes {
        return Err(ReadError::TooLarge);
    }
    String::from_utf8(bytes)
        .map_err(|e| ReadError::Failed(format!("cannot read file: not UTF-8 text ({e})")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::super::test_support::TestDir;
    use super::{config_files, read_file, ReadError};

    #[test]
    fn lists_unreadable_entries_with_the_reason() {
        let dir = TestDir::new();
        dir.write("b.yaml", "a: 1\n");
        dir.write("notes.txt", "");
        symlink("loop-b.yaml", dir.path().join("loop-a.yaml")).unwrap();
        symlink("loop-a.yaml", dir.path().join("loop-b.yaml")).unwrap();
        symlink("missing.yaml", dir.path().join("dangling.yml")).unwrap();
        symlink("b.yaml", dir.path().join("link.yaml")).unwrap();
        // Not config files, so not reported.
        symlink("self.txt", dir.path().join("self.txt")).unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();

        let files = config_files(dir.path()).unwrap();
        let listed: Vec<_> = files
            .iter()
            .map(|f| {
                let name = f.path.file_name().unwrap().to_str().unwrap();
                (name, f.unreadable.as_deref())
            })
            .collect();
        let [b, dangling, link, loop_a, loop_b] = listed[..] else {
            panic!("{listed:?}")
        };
        assert_eq!((b, link), (("b.yaml", None), ("link.yaml", None)));
        assert_eq!(dangling.0, "dangling.yml");
        assert!(
            dangling
                .1
                .unwrap()
                .starts_with("cannot follow symbolic link: "),
            "{dangling:?}"
        );
        for (name, reason) in [loop_a, loop_b] {
            let reason = reason.unwrap();
            assert!(name.starts_with("loop-"), "{name}");
            assert!(
                reason.contains("Too many levels of symbolic links"),
                "{reason}"
            );
        }
    }

    #[test]
    fn reads_files_up_to_the_limit() {
        let dir = TestDir::new();
        dir.write("ok.yaml", "0123456789");
        std::fs::write(dir.path().join("binary.yaml"), [0xff, 0xfe]).unwrap();
        let path = |name| dir.path().join(name);
        assert_eq!(read_file(&path("ok.yaml"), 10).unwrap(), "0123456789");
        assert_eq!(
            read_file(&path("ok.yaml"), 9).unwrap_err(),
            ReadError::TooLarge
        );
        let failure = |name| match read_file(&path(name), 10) {
            Err(ReadError::Failed(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert!(failure("binary.yaml").starts_with("cannot read file: not UTF-8"));
        assert!(failure("missing.yaml").starts_with("cannot read file: "));
    }
}
