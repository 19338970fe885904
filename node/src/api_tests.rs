//! Tests of the API layer: the routes against `docs/openapi.yaml`, the router against
//! [`ROUTES`], and the limits, on a real socket with a stand-in loop.

use super::*;
use std::io::{Read, Write};

/// The `(method, path)` pairs `docs/openapi.yaml` documents.
fn documented() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
    let doc: Value = serde_norway::from_str(&text).expect("docs/openapi.yaml is valid YAML");
    let mut out = Vec::new();
    for (p, item) in doc["paths"].as_object().expect("paths") {
        for m in item.as_object().expect("path item").keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&m.as_str()) {
                out.push((m.clone(), p.clone()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn openapi_lists_exactly_the_routes() {
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    let documented = documented();
    let missing: Vec<_> = served.iter().filter(|r| !documented.contains(r)).collect();
    let extra: Vec<_> = documented.iter().filter(|r| !served.contains(r)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/openapi.yaml differs from the routes noded serves:\n  served but not documented: {missing:?}\n  documented but not served: {extra:?}"
    );
}

#[test]
fn query_flags() {
    assert_eq!(flags(None).ok(), Some(Flags::default()));
    let f = flags(Some("watch=true&dryRun=All")).ok().unwrap();
    assert!(f.watch && f.dry_run);
    assert!(flags(Some("watch")).ok().unwrap().watch);
    let e = flags(Some("wacth=true")).err().unwrap();
    assert_eq!(e.status, 400);
    let e = flags(Some("watch=maybe")).err().unwrap();
    assert!(
        matches!(&e.body, Body::Json(v) if v["error"].as_str().unwrap().contains("use true or false"))
    );
}

#[test]
fn install_bodies() {
    let ok = install_body(&serde_json::json!({"path": "/x"}))
        .ok()
        .unwrap();
    assert_eq!(
        ok,
        Install {
            path: "/x".into(),
            channel: Channel::Stable,
            force: false
        }
    );
    let c = install_body(&serde_json::json!({"path": "/x", "channel": "candidate", "force": true}))
        .ok()
        .unwrap();
    assert!(c.channel == Channel::Candidate && c.force);
    let e = install_body(&serde_json::json!({"path": "/x", "channel": "beta"}))
        .err()
        .unwrap();
    assert!(
        matches!(&e.body, Body::Json(v) if v["error"].as_str().unwrap().contains("unknown channel \"beta\""))
    );
    assert!(install_body(&serde_json::json!({})).is_err());
    assert!(install_body(&serde_json::json!({"path": "/x", "extra": 1})).is_err());
}

/// A server on a temporary socket whose loop answers every request with its own name,
/// so that a test sees which request a route produced.
struct Server {
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Server {
    fn start(tag: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("noded-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sock = dir.join("api.sock");
        rt.block_on(async {
            let listener = bind(&sock).unwrap();
            let (tx, mut rx) = mpsc::channel::<Command>(8);
            let (_changed, changes) = watch::channel(0u64);
            tokio::spawn(async move {
                while let Some(c) = rx.recv().await {
                    let name = format!("{:?}", c.req);
                    let kind = name.split(['(', ' ']).next().unwrap_or("").to_string();
                    let _ = c.reply.send(Reply {
                        status: 200,
                        body: Body::Json(serde_json::json!({ "req": kind })),
                    });
                }
            });
            tokio::spawn(serve(
                listener,
                ApiState {
                    cmds: tx,
                    launchers_dir: dir.clone(),
                    changes,
                    cluster: None,
                },
            ));
        });
        Server { dir, rt }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn raw(&self, bytes: &[u8]) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(self.sock()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = &self.rt;
    }
}

#[test]
fn router_serves_every_route() {
    let s = Server::start("routes");
    for (method, path) in ROUTES {
        let concrete = path.replace("{name}", "a");
        let body = serde_json::json!({});
        let (status, v) =
            contracts::http::request(s.sock(), &method.to_uppercase(), &concrete, Some(&body))
                .unwrap_or_else(|e| panic!("{method} {concrete}: {e}"));
        // Cluster routes exist on a single node too, and say why they do not answer.
        if path.starts_with("/v1/nodes") || path.starts_with("/v1/cluster") {
            assert_eq!(status, 404, "{method} {concrete}: {v}");
            assert!(
                v["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not in a cluster"),
                "{method} {concrete}: {v}"
            );
            continue;
        }
        // Installs check their body before reaching the loop: a 400 from the handler
        // still proves the route exists.
        if *path == "/v1/launchers" && *method == "post" {
            assert_eq!(status, 400, "{v}");
            continue;
        }
        assert_eq!(status, 200, "{method} {concrete}: {v}");
        assert!(v["req"].is_string(), "{method} {concrete}: {v}");
    }
    // A VM named "receive" is still reachable with GET.
    let (_, v) = contracts::http::request(s.sock(), "GET", "/v1/vms/receive", None).unwrap();
    assert_eq!(v["req"], "GetVm");
    let (_, v) = contracts::http::request(
        s.sock(),
        "POST",
        "/v1/vms/receive",
        Some(&serde_json::json!({})),
    )
    .unwrap();
    assert_eq!(v["req"], "Receive");
    let (status, v) = contracts::http::request(s.sock(), "GET", "/v2/nothing", None).unwrap();
    assert_eq!(status, 404);
    assert_eq!(v["error"], "no route /v2/nothing");
    let (status, v) = contracts::http::request(s.sock(), "DELETE", "/v1/status", None).unwrap();
    assert_eq!(status, 405);
    assert_eq!(v["error"], "method DELETE not allowed on /v1/status");
}

#[test]
fn limits_are_kept() {
    let s = Server::start("limits");
    // Head larger than the limit: 431, before the rest is read.
    let mut big = b"GET /v1/status HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 4000));
    big.extend_from_slice(b"\r\n\r\n");
    let r = s.raw(&big);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // A declared body over the limit: 413 with a JSON error, without sending the body.
    let r = s.raw(b"PUT /v1/config HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(
        r.contains("body of 5000000 bytes exceeds the limit of 1048576 bytes"),
        "{r}"
    );
    // A chunked body that grows past the limit is cut off at the limit.
    let mut chunked = b"PUT /v1/config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..(MAX_BODY_BYTES / chunk.len() + 2) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = s.raw(&chunked);
    assert!(r.starts_with("HTTP/1.1 413"), "{}", &r[..r.len().min(300)]);
    // A small chunked body is read (within the limit) and judged as JSON.
    let r = s
        .raw(b"POST /v1/vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("body is not valid JSON"),
        "{r}"
    );
    // Bad JSON and garbage are refused with a reason.
    let r = s.raw(b"PUT /v1/config HTTP/1.1\r\nContent-Length: 4\r\n\r\n{bad");
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("body is not valid JSON"),
        "{r}"
    );
    assert!(s.raw(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    // The server survived all of that.
    let (status, _) = contracts::http::request(s.sock(), "GET", "/v1/status", None).unwrap();
    assert_eq!(status, 200);
}

/// The property names a component schema of `docs/openapi.yaml` lists.
fn schema_fields(name: &str) -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let doc: Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .cloned()
        .collect()
}

fn keys(v: impl serde::Serialize) -> std::collections::BTreeSet<String> {
    serde_json::to_value(v)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn openapi_lists_exactly_the_fields() {
    use crate::views::*;
    let spec = crate::spec::parse_spec_text("name: a\nkernel: /k\nmemory: 64Mi").unwrap();
    let cond = VmCondition {
        type_: "Ready".into(),
        status: "True".into(),
        last_transition_time: "t".into(),
        reason: "r".into(),
        message: "m".into(),
    };
    let some = || Some("x".to_string());
    let vm = VmView {
        name: "a".into(),
        phase: "Running".into(),
        launcher_version: some(),
        outdated: false,
        migratable: true,
        reason: some(),
        machine_type: "q35-1.0".into(),
        run_strategy: "Always".into(),
        serial_log: "/l".into(),
        migratable_reason: some(),
        message: some(),
        pid: Some(1),
        created_at: "t".into(),
        restart_required: false,
        pending_changes: vec![],
        pending_machine_type: some(),
        cross_host_migratable: true,
        cross_host_reason: some(),
        conditions: vec![cond.clone()],
        spec: Some(spec.clone()),
        pending_spec: Some(spec.clone()),
    };
    let node = NodeStatus {
        target_launcher_version: some(),
        approval_pending: false,
        approved_launcher_version: some(),
        outdated_virtual_machine_instance_workloads: 0,
        conditions: vec![],
        virtual_machines: 0,
        approval_strategy: "Automatic".into(),
        workload_update_methods: vec![],
        channel: "stable".into(),
        untested_update_path: some(),
    };
    let mig = MigrationView {
        started_at: "t".into(),
        finished_at: some(),
        outcome: "Succeeded".into(),
        source_version: "1".into(),
        target_version: "2".into(),
        report: Value::Null,
    };
    let launcher = LauncherView {
        version: "1".into(),
        path: "/p".into(),
        installed_at: "t".into(),
        machine_types: vec![],
        channel: "stable".into(),
        target: true,
        approved: true,
        capabilities: Value::Null,
    };
    let event = crate::events::EventView {
        time: "t".into(),
        type_: "Normal".into(),
        reason: "Created".into(),
        message: "m".into(),
    };
    let cases = [
        ("Vm", keys(&vm)),
        ("VmCondition", keys(&cond)),
        ("VmSpec", keys(&spec)),
        ("NodeStatus", keys(&node)),
        (
            "Condition",
            keys(Condition::new("Available", true, "R", "m")),
        ),
        ("MigrationRecord", keys(&mig)),
        ("Launcher", keys(&launcher)),
        ("Event", keys(&event)),
    ];
    // The settings document (GET /v1/config) is camelCase all the way down.
    fn walk(v: &Value, at: &str) {
        if let Some(o) = v.as_object() {
            for (k, x) in o {
                assert!(!k.contains('_'), "settings {at}.{k} is not camelCase");
                walk(x, &format!("{at}.{k}"));
            }
        }
    }
    walk(&crate::settings::NodeSettings::default().to_json(), "");
    for (schema, served) in cases {
        let documented = schema_fields(schema);
        assert_eq!(
            served, documented,
            "schema {schema}: served vs docs/openapi.yaml"
        );
        for k in &served {
            assert!(
                !k.contains('_'),
                "{schema}.{k}: every name on the wire is camelCase"
            );
        }
    }
}

/// A real OpenAPI validator (`openapi-spec-validator` from PyPI; `.ci/run` installs it)
/// accepts the file.
#[test]
fn openapi_validator_accepts_the_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let out = match std::process::Command::new("openapi-spec-validator")
        .arg(path)
        .output()
    {
        Ok(o) => o,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: openapi-spec-validator not installed ({e}); pip install openapi-spec-validator");
            return;
        }
        Err(e) => panic!("openapi-spec-validator is required in CI: {e}"),
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
