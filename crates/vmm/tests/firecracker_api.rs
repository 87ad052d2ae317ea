//! The Firecracker API client against a Unix-socket HTTP server that replays recorded answers:
//! each exchange asserts the request's method, path and JSON body, then sends the recorded
//! status and body (Firecracker v1.16's, including its `{"fault_message": …}` errors).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hutch_vmm::firecracker::api::*;
use hutch_vmm::firecracker::{FirecrackerClient, FirecrackerError};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// One recorded exchange.
struct Exchange {
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
    status: u16,
    reply: &'static str,
}

fn ex(
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
    status: u16,
    reply: &'static str,
) -> Exchange {
    Exchange {
        method,
        path,
        body,
        status,
        reply,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        _ => "Internal Server Error",
    }
}

/// Reads one HTTP/1.1 request (headers, then `Content-Length` bytes); `None` at EOF.
async fn read_request(s: &mut UnixStream) -> Option<(String, String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        head.push(b[0]);
        assert!(head.len() < 16 * 1024, "request head too long");
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap().split(' ');
    let method = first.next().unwrap().to_string();
    let path = first.next().unwrap().to_string();
    assert_eq!(first.next(), Some("HTTP/1.1"));
    let mut len = 0;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    Some((method, path, body))
}

/// Serves `script` in order on `sock`, one request at a time, over as many connections as the
/// client opens; returns how many exchanges were served.
async fn replay(listener: UnixListener, script: Vec<Exchange>) -> usize {
    let mut it = script.into_iter();
    let mut served = 0;
    'conns: loop {
        let Ok((mut s, _)) = listener.accept().await else {
            break;
        };
        while let Some((method, path, body)) = read_request(&mut s).await {
            let Some(want) = it.next() else {
                panic!("unexpected request {method} {path}");
            };
            assert_eq!(
                (method.as_str(), path.as_str()),
                (want.method, want.path),
                "request #{served}"
            );
            match &want.body {
                Some(v) => {
                    let got: Value = serde_json::from_slice(&body)
                        .unwrap_or_else(|e| panic!("{path}: body is not JSON ({e})"));
                    assert_eq!(&got, v, "{method} {path} body");
                }
                None => assert!(body.is_empty(), "{method} {path} has a body"),
            }
            let mut resp = format!("HTTP/1.1 {} {}\r\n", want.status, reason(want.status));
            if !want.reply.is_empty() {
                resp.push_str("Content-Type: application/json\r\n");
            }
            resp.push_str(&format!(
                "Content-Length: {}\r\n\r\n{}",
                want.reply.len(),
                want.reply
            ));
            s.write_all(resp.as_bytes()).await.unwrap();
            served += 1;
            if served > 0 && it.len() == 0 {
                break 'conns;
            }
        }
    }
    served
}

struct Server {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    task: tokio::task::JoinHandle<usize>,
}

fn serve(script: Vec<Exchange>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let task = tokio::spawn(replay(l, script));
    Server {
        _dir: dir,
        sock,
        task,
    }
}

impl Server {
    fn client(&self) -> FirecrackerClient {
        FirecrackerClient::new(&self.sock).with_timeout(Duration::from_secs(5))
    }

    async fn finish(self, want: usize) {
        let n = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server done")
            .expect("server assertions");
        assert_eq!(n, want, "exchanges served");
    }
}

/// The error chain as one line, as the CLI prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[tokio::test]
async fn configure_and_boot_sequence() {
    let server = serve(vec![
        ex(
            "GET",
            "/version",
            None,
            200,
            r#"{"firecracker_version":"1.16.1"}"#,
        ),
        ex(
            "GET",
            "/",
            None,
            200,
            r#"{"id":"sbx-1","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        ),
        ex(
            "PUT",
            "/logger",
            Some(json!({"log_path": "/r/fc.log", "level": "Warning", "show_level": true})),
            204,
            "",
        ),
        ex(
            "PUT",
            "/metrics",
            Some(json!({"metrics_path": "/r/metrics.fifo"})),
            204,
            "",
        ),
        ex(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2, "mem_size_mib": 512, "track_dirty_pages": true})),
            204,
            "",
        ),
        ex(
            "GET",
            "/machine-config",
            None,
            200,
            r#"{"vcpu_count":2,"mem_size_mib":512,"smt":false,"track_dirty_pages":true,"huge_pages":"None"}"#,
        ),
        ex(
            "PUT",
            "/boot-source",
            Some(
                json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0",
                        "initrd_path": "/k/initrd"}),
            ),
            204,
            "",
        ),
        ex(
            "PUT",
            "/drives/root",
            Some(
                json!({"drive_id": "root", "is_root_device": false, "is_read_only": true,
                        "path_on_host": "/i/rootfs.ext4", "cache_type": "Unsafe",
                        "io_engine": "Sync",
                        "rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}}}),
            ),
            204,
            "",
        ),
        ex(
            "PUT",
            "/network-interfaces/eth0",
            Some(json!({"iface_id": "eth0", "host_dev_name": "tap0",
                        "guest_mac": "06:00:0a:00:00:02",
                        "tx_rate_limiter": {"bandwidth": {"size": 10485760,
                                            "one_time_burst": 1048576, "refill_time": 1000}}})),
            204,
            "",
        ),
        ex(
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 3, "uds_path": "/r/vsock.sock"})),
            204,
            "",
        ),
        ex("PUT", "/entropy", Some(json!({})), 204, ""),
        ex(
            "PUT",
            "/balloon",
            Some(json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1})),
            204,
            "",
        ),
        ex(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
            204,
            "",
        ),
        ex(
            "PATCH",
            "/balloon",
            Some(json!({"amount_mib": 64})),
            204,
            "",
        ),
        ex(
            "PATCH",
            "/network-interfaces/eth0",
            Some(json!({"iface_id": "eth0",
                        "rx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}})),
            204,
            "",
        ),
        ex(
            "GET",
            "/balloon",
            None,
            200,
            r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1}"#,
        ),
        ex(
            "PUT",
            "/actions",
            Some(json!({"action_type": "FlushMetrics"})),
            204,
            "",
        ),
    ]);
    let c = server.client();
    assert_eq!(c.version().await.unwrap().firecracker_version, "1.16.1");
    let info = c.describe_instance().await.unwrap();
    assert_eq!(info.state, InstanceState::NotStarted);
    assert_eq!(info.id, "sbx-1");
    c.put_logger(&Logger {
        log_path: Some("/r/fc.log".into()),
        level: Some(LogLevel::Warning),
        show_level: Some(true),
        ..Default::default()
    })
    .await
    .unwrap();
    c.put_metrics(&Metrics {
        metrics_path: "/r/metrics.fifo".into(),
    })
    .await
    .unwrap();
    let mut m = MachineConfig::new(2, 512);
    m.track_dirty_pages = Some(true);
    c.put_machine_config(&m).await.unwrap();
    let got = c.machine_config().await.unwrap();
    assert_eq!(got.huge_pages, Some(HugePages::None));
    assert_eq!((got.vcpu_count, got.mem_size_mib), (2, 512));
    c.put_boot_source(&BootSource {
        kernel_image_path: "/k/vmlinux".into(),
        boot_args: Some("console=ttyS0".into()),
        initrd_path: Some("/k/initrd".into()),
    })
    .await
    .unwrap();
    let mut root = Drive::file("root", "/i/rootfs.ext4", true);
    root.cache_type = Some(CacheType::Unsafe);
    root.io_engine = Some(IoEngine::Sync);
    root.rate_limiter = Some(RateLimiter {
        bandwidth: None,
        ops: Some(TokenBucket {
            size: 1000,
            one_time_burst: None,
            refill_time: 1000,
        }),
    });
    c.put_drive(&root).await.unwrap();
    c.put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
        guest_mac: Some("06:00:0a:00:00:02".into()),
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 10 << 20,
                one_time_burst: Some(1 << 20),
                refill_time: 1000,
            }),
            ops: None,
        }),
    })
    .await
    .unwrap();
    c.put_vsock(&Vsock {
        guest_cid: 3,
        uds_path: "/r/vsock.sock".into(),
    })
    .await
    .unwrap();
    c.put_entropy(&EntropyDevice::default()).await.unwrap();
    c.put_balloon(&Balloon {
        amount_mib: 0,
        deflate_on_oom: true,
        stats_polling_interval_s: Some(1),
        free_page_hinting: None,
        free_page_reporting: None,
    })
    .await
    .unwrap();
    c.instance_start().await.unwrap();
    c.patch_balloon(&BalloonUpdate { amount_mib: 64 })
        .await
        .unwrap();
    // A bucket of size 0 turns that limit off.
    c.patch_network_interface(&PartialNetworkInterface {
        iface_id: "eth0".into(),
        rx_rate_limiter: Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 0,
                one_time_burst: None,
                refill_time: 0,
            }),
            ops: None,
        }),
        tx_rate_limiter: None,
    })
    .await
    .unwrap();
    assert_eq!(c.balloon().await.unwrap().amount_mib, 64);
    c.action(ActionType::FlushMetrics).await.unwrap();
    server.finish(17).await;
}

#[tokio::test]
async fn pause_snapshot_and_load() {
    let server = serve(vec![
        ex("PATCH", "/vm", Some(json!({"state": "Paused"})), 204, ""),
        ex(
            "GET",
            "/",
            None,
            200,
            r#"{"id":"a","state":"Paused","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        ),
        ex(
            "PUT",
            "/snapshot/create",
            Some(
                json!({"mem_file_path": "/s/mem", "snapshot_path": "/s/state",
                        "snapshot_type": "Full"}),
            ),
            204,
            "",
        ),
        ex(
            "PUT",
            "/snapshot/create",
            Some(
                json!({"mem_file_path": "/s/mem.diff", "snapshot_path": "/s/state.diff",
                        "snapshot_type": "Diff"}),
            ),
            204,
            "",
        ),
        ex("PATCH", "/vm", Some(json!({"state": "Resumed"})), 204, ""),
        ex(
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": "/s/state",
                        "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"},
                        "track_dirty_pages": true, "resume_vm": true,
                        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
                        "vsock_override": {"uds_path": "/r2/vsock.sock"}})),
            204,
            "",
        ),
    ]);
    let c = server.client();
    c.set_vm_state(VmState::Paused).await.unwrap();
    assert_eq!(
        c.describe_instance().await.unwrap().state,
        InstanceState::Paused
    );
    for (ty, mem, state) in [
        (SnapshotType::Full, "/s/mem", "/s/state"),
        (SnapshotType::Diff, "/s/mem.diff", "/s/state.diff"),
    ] {
        c.create_snapshot(&SnapshotCreateParams {
            mem_file_path: mem.into(),
            snapshot_path: state.into(),
            snapshot_type: Some(ty),
        })
        .await
        .unwrap();
    }
    c.set_vm_state(VmState::Resumed).await.unwrap();
    let mut load = SnapshotLoadParams::from_file("/s/state", "/s/mem");
    load.track_dirty_pages = Some(true);
    load.resume_vm = Some(true);
    load.network_overrides.push(NetworkOverride {
        iface_id: "eth0".into(),
        host_dev_name: "tap7".into(),
    });
    load.vsock_override = Some(VsockOverride {
        uds_path: "/r2/vsock.sock".into(),
    });
    c.load_snapshot(&load).await.unwrap();
    server.finish(6).await;
}

#[tokio::test]
async fn fault_message_reaches_the_error() {
    // Recorded from v1.16.1 given a bzImage.
    let fault = "Invalid Elf magic number";
    let server = serve(vec![
        ex(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/k/vmlinuz"})),
            400,
            r#"{"fault_message":"Invalid Elf magic number"}"#,
        ),
        ex(
            "PATCH",
            "/vm",
            Some(json!({"state": "Paused"})),
            400,
            r#"{"fault_message":"The requested operation is not supported before starting the microVM."}"#,
        ),
        // A server error without the JSON error body still says something.
        ex("GET", "/version", None, 500, "internal oops"),
        // A success with a body that is not the promised JSON.
        ex("GET", "/", None, 200, "{not json"),
    ]);
    let c = server.client();
    let e = c
        .put_boot_source(&BootSource {
            kernel_image_path: "/k/vmlinuz".into(),
            boot_args: None,
            initrd_path: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.fault_message(), Some(fault));
    assert_eq!(
        chain(&e),
        "firecracker API PUT /boot-source failed: HTTP 400: Invalid Elf magic number"
    );
    // Through VmmError (transparent), the chain is the same.
    let v: hutch_vmm::VmmError = e.into();
    assert!(
        chain(&v).ends_with("HTTP 400: Invalid Elf magic number"),
        "{}",
        chain(&v)
    );

    let e = c.set_vm_state(VmState::Paused).await.unwrap_err();
    match &e {
        FirecrackerError::Api {
            method,
            path,
            fault,
        } => {
            assert_eq!(
                (*method, path.as_str(), fault.status),
                ("PATCH", "/vm", 400)
            );
            assert!(fault.fault_message.contains("before starting the microVM"));
        }
        other => panic!("{other:?}"),
    }
    let e = c.version().await.unwrap_err();
    assert_eq!(
        chain(&e),
        "firecracker API GET /version failed: HTTP 500: internal oops"
    );
    let e = c.describe_instance().await.unwrap_err();
    assert!(matches!(e, FirecrackerError::Json { .. }), "{e:?}");
    server.finish(4).await;
}

#[tokio::test]
async fn refuses_bad_ids_before_sending() {
    let server = serve(vec![]);
    let c = server.client();
    let e = c
        .put_drive(&Drive::file("../actions", "/x", true))
        .await
        .unwrap_err();
    assert!(matches!(e, FirecrackerError::InvalidDeviceId(_)), "{e:?}");
    drop(server);
}

#[tokio::test]
async fn no_socket_and_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let c = FirecrackerClient::new(dir.path().join("none.sock"));
    let e = c.version().await.unwrap_err();
    assert!(matches!(e, FirecrackerError::Connect { .. }), "{e:?}");

    // A server that accepts and never answers: the call is bounded.
    let sock = dir.path().join("mute.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let _keep = tokio::spawn(async move {
        let (_s, _) = l.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let c = FirecrackerClient::new(&sock).with_timeout(Duration::from_millis(200));
    let t = std::time::Instant::now();
    let e = c.version().await.unwrap_err();
    assert!(
        matches!(e, FirecrackerError::Timeout { ms: 200, .. }),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(Path::new(&sock).exists());
}
