//! Hot reload: an inotify watch of the config directory, asking for a load on every change.

use std::convert::Infallible;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::Reloader;

/// The config directory could not be watched at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch config directory {}: {source}", dir.display())]
pub struct WatchError {
    pub dir: PathBuf,
    pub source: io::Error,
}

/// Time to let a burst of events (an editor save, a `kubectl apply`) settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often to look for the directory while it is missing (and so cannot be watched).
const RETRY: Duration = Duration::from_millis(100);

/// Changes to the directory entries, plus the directory itself going away.
const EVENTS: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

/// The watched inode is no longer the directory at `dir` (or no longer watched at all).
const WATCH_LOST: AddWatchFlags = AddWatchFlags::IN_DELETE_SELF
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_IGNORED);

/// Asks `reloader` for a load of `dir` whenever it changes; the load starts typically
/// within 30 ms of a write, or after the one running then.
///
/// Any event triggers a reload, without looking at file names: Kubernetes ConfigMap
/// volumes only signal updates through their hidden `..data` symlink. If the directory
/// itself is deleted or moved away, it is watched again once it reappears at `dir`. Every
/// successful load becomes a new generation even if nothing changed, which is simpler than
/// comparing snapshots and costs little since reloads are rare. A failed load is logged and
/// recorded with [`super::ConfigStore::reject`]; the previous config keeps serving.
///
/// Only returns if inotify cannot be set up or `dir` cannot be watched initially.
pub async fn watch_dir(dir: PathBuf, reloader: Reloader) -> Result<Infallible, WatchError> {
    watch(&dir, &reloader)
        .await
        .map_err(|source| WatchError { dir, source })
}

async fn watch(dir: &Path, reloader: &Reloader) -> io::Result<Infallible> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let mut watched = Some(inotify.add_watch(dir, EVENTS)?);
    // Deprecated since tokio 1.54 in favour of an `unsafe` constructor, because an arbitrary
    // `AsRawFd` might not own its descriptor; `InotifyFd` does, and this crate has no `unsafe`.
    #[allow(deprecated)]
    let inotify = AsyncFd::with_interest(InotifyFd(inotify), Interest::READABLE)?;
    loop {
        let was_lost = watched.is_none();
        match watched {
            Some(wd) => {
                let events = next_events(&inotify).await?;
                if events
                    .iter()
                    .any(|e| e.wd == wd && e.mask.intersects(WATCH_LOST))
                {
                    // Still needed after a move; after a deletion the kernel already removed it.
                    let _ = inotify.get_ref().0.rm_watch(wd);
                    watched = None;
                }
            }
            None => tokio::time::sleep(RETRY).await,
        }
        if watched.is_none() {
            watched = inotify.get_ref().0.add_watch(dir, EVENTS).ok();
            if watched.is_none() && was_lost {
                continue; // Still missing, and the load error was already reported.
            }
        }
        reloader.request();
    }
}

/// Waits for an event, lets the burst settle, then drains everything queued.
async fn next_events(inotify: &AsyncFd<InotifyFd>) -> io::Result<Vec<InotifyEvent>> {
    let mut ready = inotify.readable().await?;
    tokio::time::sleep(DEBOUNCE).await;
    let mut events = Vec::new();
    // `try_io` clears the readiness once a read would block, ending the loop.
    while let Ok(batch) =
        ready.try_io(|inotify| inotify.get_ref().0.read_events().map_err(io::Error::from))
    {
        events.extend(batch?);
    }
    Ok(events)
}

/// `AsyncFd` needs `AsRawFd`, which nix's `Inotify` only provides through `AsFd`.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::{sleep, timeout, Instant};

    use super::super::test_support::TestDir;
    use super::super::{ConfigStore, LoadOptions, Reloader};
    use super::watch_dir;

    /// Generous, since the machine running the tests may be busy; the watcher needs ~20 ms.
    const TIMEOUT: Duration = Duration::from_secs(2);

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    fn service(port: u32) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{ports: [{{port: {port}}}]}}\n"
        )
    }

    async fn next_generation(rx: &mut tokio::sync::watch::Receiver<u64>) -> u64 {
        timeout(TIMEOUT, rx.changed())
            .await
            .expect("no reload")
            .unwrap();
        *rx.borrow_and_update()
    }

    async fn rejection(store: &ConfigStore) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(error) = store.last_error() {
                return error;
            }
            assert!(Instant::now() < deadline, "no rejected load");
            sleep(Duration::from_millis(5)).await;
        }
    }

    fn ports(store: &ConfigStore) -> Vec<u16> {
        let config = store.current();
        config
            .services()
            .iter()
            .flat_map(|s| s.ports.iter().map(|p| p.port))
            .collect()
    }

    #[tokio::test]
    async fn applies_good_changes_and_rejects_bad_ones() {
        let root = TestDir::new();
        let dir = root.path().join("conf");
        fs::create_dir(&dir).unwrap();
        let store = Arc::new(ConfigStore::unloaded());
        let mut rx = store.subscribe();
        let reloader = Reloader::spawn(dir.clone(), LoadOptions::default(), store.clone());
        timeout(TIMEOUT, store.first_load()).await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 1, "the empty directory");
        let watcher = tokio::spawn(watch_dir(dir.clone(), reloader.unwrap()));
        sleep(Duration::from_millis(50)).await; // Let it install the watch.

        fs::write(dir.join("mesh.yaml"), NAMESPACE).unwrap();
        assert_eq!(next_generation(&mut rx).await, 2);
        assert!(store.current().namespace("shop").is_some());
        assert_eq!(store.last_error(), None);

        fs::write(dir.join("web.yaml"), service(0)).unwrap();
        let error = rejection(&store).await;
        assert!(
            error.contains("web.yaml: Service shop/web: spec.ports[0].port: "),
            "{error}"
        );
        assert_eq!(store.generation(), 2);
        assert!(!rx.has_changed().unwrap());
        assert!(
            store.current().services().is_empty(),
            "old config keeps serving"
        );

        fs::write(dir.join("web.yaml"), service(80)).unwrap();
        assert_eq!(next_generation(&mut rx).await, 3);
        assert_eq!(store.last_error(), None);
        assert_eq!(ports(&store), [80]);

        // The directory is replaced: the new one is picked up, and watched from then on.
        fs::rename(&dir, root.path().join("old")).unwrap();
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("web.yaml"), service(81)).unwrap();
        assert_eq!(next_generation(&mut rx).await, 4);
        assert_eq!(ports(&store), [81]);
        fs::write(dir.join("web.yaml"), service(82)).unwrap();
        assert_eq!(next_generation(&mut rx).await, 5);
        assert_eq!(ports(&store), [82]);

        // Deleted, and recreated only after the watcher noticed: it polls until it is back.
        fs::remove_dir_all(&dir).unwrap();
        assert!(rejection(&store)
            .await
            .contains("cannot read config directory"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("web.yaml"), service(83)).unwrap();
        assert_eq!(next_generation(&mut rx).await, 6);
        assert_eq!(ports(&store), [83]);
        assert_eq!(store.last_error(), None);

        watcher.abort();
    }
}
