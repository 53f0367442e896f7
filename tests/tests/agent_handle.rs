//! Self-test of the `Agent` handle against a stand-in `nodemesh` (a Python
//! script that speaks just enough of the CLI), so the handle's start,
//! readiness wait, crash, restart, stop and uninstall-on-drop are checked
//! without the real agent.

use nodemesh_testbed::workload_apps::python3;
use nodemesh_testbed::{Agent, Topology};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const FAKE_NODEMESH: &str = r#"
import json, os, signal, socket, sys, time
args = sys.argv[1:]
here = os.path.dirname(os.path.abspath(__file__))

def opt(name):
    return args[args.index(name) + 1]

def netns():
    return os.stat("/proc/self/ns/net").st_ino

if args[0] == "agent":
    path = opt("--admin-socket")
    node = opt("--node-name")
    if os.path.exists(path):
        os.unlink(path)
    time.sleep(0.3)  # not ready at once: the handle must wait
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(16)
    def term(*_):
        print("fake agent: SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print("fake agent %s up" % node, flush=True)
    while True:
        conn, _ = srv.accept()
        bpffs = any(l.split()[1:3] == ["/sys/fs/bpf", "bpf"] for l in open("/proc/self/mounts"))
        doc = {"node": node, "pid": os.getpid(), "netns": netns(), "bpffs": bpffs}
        conn.sendall(json.dumps(doc).encode())
        conn.close()
elif args[0] == "status":
    s = socket.socket(socket.AF_UNIX)
    s.connect(opt("--socket"))
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.decode())
elif args[0] == "uninstall":
    with open(os.path.join(here, "uninstalled"), "a") as f:
        f.write(opt("--node-name") + "\n")
else:
    print("fake nodemesh: unknown command %r" % args, file=sys.stderr)
    sys.exit(2)
"#;

fn fake_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("nodemesh");
    std::fs::write(&bin, format!("#!{}\n{FAKE_NODEMESH}", python3())).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn agent_handle_lifecycle() {
    let mut topo = Topology::new().unwrap();
    let node = topo.add_node("node-a").unwrap();
    let bin_dir = topo.work_dir().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let bin = fake_bin(&bin_dir);
    let config = topo.work_dir().join("config");
    let node_netns = std::fs::metadata(&node.netns_path).unwrap();
    let node_ino = std::os::unix::fs::MetadataExt::ino(&node_netns);

    {
        let mut agent = Agent::start_with(&mut topo, "node-a", &config, &bin, &[]).unwrap();
        assert!(config.is_dir());
        assert_eq!(agent.socket(), topo.work_dir().join("node-a.sock"));
        let status = agent.status_json().unwrap();
        assert_eq!(status["node"], node.node_name.as_str());
        assert_eq!(
            status["netns"], node_ino,
            "agent is not in the node's netns"
        );
        assert_eq!(status["bpffs"], true, "bpffs not visible to the agent");
        let first_pid = agent.pid().unwrap();
        assert_eq!(status["pid"], first_pid);

        // Crash and restart.
        agent.kill();
        assert!(!agent.is_running());
        assert!(agent.status_json().is_err());
        agent.restart(&mut topo).unwrap();
        let status = agent.status_json().unwrap();
        assert_ne!(status["pid"], first_pid);

        // Graceful stop, then restart while running.
        agent.stop();
        assert_eq!(agent.last_exit().unwrap().code(), Some(0));
        assert!(
            agent.log().contains("fake agent: SIGTERM"),
            "{}",
            agent.log()
        );
        agent.restart(&mut topo).unwrap();
        agent.restart(&mut topo).unwrap();
        assert_eq!(agent.log().matches("start #").count(), 4, "{}", agent.log());
        assert!(!bin_dir.join("uninstalled").exists());
    }
    // Drop stopped the agent and ran `nodemesh uninstall --node-name`.
    let uninstalled = std::fs::read_to_string(bin_dir.join("uninstalled")).unwrap();
    assert_eq!(uninstalled.trim(), node.node_name);
}

#[test]
fn agent_start_failure_shows_the_log() {
    let mut topo = Topology::new().unwrap();
    topo.add_node("node-a").unwrap();
    let bin = topo.work_dir().join("nodemesh");
    std::fs::write(&bin, "#!/bin/sh\necho 'boom: bad flag' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = topo.work_dir().join("config");
    let err = Agent::start_with(&mut topo, "node-a", &config, &bin, &["--bogus"])
        .err()
        .expect("start must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("exited during startup"), "{msg}");
    assert!(msg.contains("boom: bad flag"), "{msg}");
}
