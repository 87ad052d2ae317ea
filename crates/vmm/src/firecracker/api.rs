//! Request and response bodies of Firecracker's HTTP API, as in its v1.16 swagger
//! (`src/firecracker/swagger/firecracker.yaml`).
//!
//! Field names and enum spellings are the swagger's exactly. Optional fields are `Option`s left
//! out of the JSON when `None`, so Firecracker applies its own defaults. Paths are `PathBuf`s and
//! must be UTF-8 (serializing a non-UTF-8 path fails before anything is sent). Unknown fields in
//! responses are ignored, so a newer Firecracker's additions do not break us.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT/PATCH/GET /machine-config` (`MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// 1–32; 1 or even when `smt` is on.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading (x86 only); default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// KVM dirty-page tracking, needed for efficient diff snapshots; default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages backing guest memory; default `None` (4K pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// Deprecated static CPU template (`C3`, `T2`, …, `None`): kept only so GET round-trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl MachineConfig {
    /// `vcpu_count` vCPUs and `mem_size_mib` MiB, everything else Firecracker's default.
    pub fn new(vcpu_count: u8, mem_size_mib: u32) -> Self {
        Self {
            vcpu_count,
            mem_size_mib,
            smt: None,
            track_dirty_pages: None,
            huge_pages: None,
            cpu_template: None,
        }
    }
}

/// `MachineConfiguration.huge_pages` (v1.16: `None` or `2M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Regular 4 KiB pages.
    None,
    /// hugetlbfs 2 MiB pages (`mem_size_mib` must be even).
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /boot-source` (`BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// The guest kernel: an uncompressed ELF `vmlinux` on x86_64 (v1.16 refuses a bzImage with
    /// "Invalid Elf magic number").
    pub kernel_image_path: PathBuf,
    /// The kernel command line; replaces Firecracker's default one entirely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// The initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `PUT /drives/{drive_id}` (`Drive`). `drive_id` must equal the path's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// The drive's id (also the last path segment of the request).
    pub drive_id: String,
    /// Whether the guest boots from it (`root=` is then set by Firecracker).
    pub is_root_device: bool,
    /// The boot partition's unique id; only used with `is_root_device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Caching strategy; default `Unsafe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Read-only (virtio-block only; required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The backing file (virtio-block only; required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Bandwidth and ops limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// `Sync` (default) or `Async` (io_uring; host kernel > 5.10.51).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// vhost-user-block backend socket, instead of `path_on_host`/`is_read_only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Drive {
    /// A virtio-block drive backed by `path`.
    pub fn file(id: impl Into<String>, path: impl Into<PathBuf>, read_only: bool) -> Self {
        Self {
            drive_id: id.into(),
            is_root_device: false,
            partuuid: None,
            cache_type: None,
            is_read_only: Some(read_only),
            path_on_host: Some(path.into()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }
}

/// `Drive.cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// No flush on guest request (the default).
    Unsafe,
    /// Honour the guest's flushes.
    Writeback,
}

/// `Drive.io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O (the default).
    Sync,
    /// io_uring.
    Async,
}

/// `PATCH /drives/{drive_id}` after boot (`PartialDrive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDrive {
    /// The drive's id.
    pub drive_id: String,
    /// A new backing file (the guest sees a config change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// New limits, merged into the current ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}` (`NetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// The interface's id (also the last path segment of the request).
    pub iface_id: String,
    /// The host TAP device's name.
    pub host_dev_name: String,
    /// The guest MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest (68–65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on traffic into the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on traffic out of the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}` after boot: rate limiters only
/// (`PartialNetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialNetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// An I/O rate limiter: independent byte and operation buckets (`RateLimiter`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    /// Bytes as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// A token bucket (`TokenBucket`). A `size` of 0 disables the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Capacity in tokens.
    pub size: u64,
    /// An initial extra budget, consumed before refilling starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// `PUT /vsock` (`Vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// The guest's context id (≥ 3).
    pub guest_cid: u32,
    /// The host Unix socket Firecracker listens on for host-initiated connections; guest-initiated
    /// ones go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// `PUT /entropy` (`EntropyDevice`): a virtio-rng device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {
    /// Limits on the entropy the guest can draw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /balloon` and `GET /balloon` (`Balloon`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest is under memory pressure.
    pub deflate_on_oom: bool,
    /// Statistics interval in seconds; non-zero enables statistics (pre-boot only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_s: Option<u32>,
    /// Free page hinting (developer preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
    /// Free page reporting (needs the guest's `PAGE_REPORTING`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

/// `PATCH /balloon` (`BalloonUpdate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonUpdate {
    /// New target size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics` (`BalloonStatsUpdate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatsUpdate {
    /// New statistics interval in seconds.
    pub stats_polling_interval_s: u32,
}

/// `PUT /logger` (`Logger`). Configurable once per process, and not restored by a snapshot load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// File or named pipe for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The level; default `Info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the source file and line of each message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path, e.g. `api_server::request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `Logger.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `PUT /metrics` (`Metrics`). Not restored by a snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// File or named pipe the JSON lines are flushed to.
    pub metrics_path: PathBuf,
}

/// `PUT /mmds/config` (`MmdsConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmdsConfig {
    /// `V1` (default, deprecated) or `V2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MmdsVersion>,
    /// Interfaces whose traffic to `ipv4_address` reaches the MMDS.
    pub network_interfaces: Vec<String>,
    /// A link-local address; default `169.254.169.254`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// Answer `text/plain` whatever the Accept header, as EC2's IMDS does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

/// `MmdsConfig.version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum MmdsVersion {
    V1,
    V2,
}

/// `PUT /actions` (`InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Flush the metrics now.
    FlushMetrics,
    /// Boot the configured VM; succeeds only once per process.
    InstanceStart,
    /// Press Ctrl-Alt-Del in the guest (x86; needs i8042 support in the guest kernel). With
    /// `reboot=k`, the guest's reboot makes Firecracker exit.
    SendCtrlAltDel,
}

/// `PATCH /vm` (`Vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateUpdate {
    /// The wanted state.
    pub state: VmState,
}

/// `Vm.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Freeze the vCPUs.
    Paused,
    /// Let them run again.
    Resumed,
}

/// `GET /vm/config` (`FullVmConfiguration`): the parts Hutch reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VmConfig {
    /// The configured network interfaces (after a snapshot load, with the overridden TAPs).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
}

/// `GET /` (`InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name (`Firecracker`).
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// Where the instance is in its life.
    pub state: InstanceState,
    /// Firecracker's version.
    pub vmm_version: String,
}

/// `InstanceInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configuring: `InstanceStart` or a snapshot load has not happened yet.
    #[serde(rename = "Not started")]
    NotStarted,
    /// The vCPUs run.
    Running,
    /// The vCPUs are frozen.
    Paused,
}

/// `GET /version` (`FirecrackerVersion`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// E.g. `1.16.1`.
    pub firecracker_version: String,
}

/// `PUT /snapshot/create` (`SnapshotCreateParams`); the VM must be paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// Where the guest memory is written.
    pub mem_file_path: PathBuf,
    /// Where the microVM state is written.
    pub snapshot_path: PathBuf,
    /// `Full` (default) or `Diff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// State plus all of guest memory.
    Full,
    /// State plus the pages dirtied since the last snapshot (developer preview).
    Diff,
}

/// `PUT /snapshot/load` (`SnapshotLoadParams`); only on a fresh process with nothing but the
/// logger and metrics configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// The microVM state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from (the deprecated `mem_file_path` is never sent).
    pub mem_backend: MemoryBackend,
    /// Track dirty pages again, for later diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume at once; otherwise the loaded VM is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// New TAP devices for the snapshot's interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// A new vsock socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// x86_64: advance kvmclock by the wall-clock time since the snapshot (host ≥ 5.16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

impl SnapshotLoadParams {
    /// Loads `snapshot_path` with memory mapped from the file `mem_file` (the `File` backend),
    /// paused, with no overrides.
    pub fn from_file(snapshot_path: impl Into<PathBuf>, mem_file: impl Into<PathBuf>) -> Self {
        Self {
            snapshot_path: snapshot_path.into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: mem_file.into(),
            },
            track_dirty_pages: None,
            resume_vm: None,
            network_overrides: Vec::new(),
            vsock_override: None,
            clock_realtime: None,
        }
    }
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// `File` or `Uffd`.
    pub backend_type: MemoryBackendType,
    /// The memory file (`File`, mapped private and copy-on-write; keep it unchanged for the VM's
    /// whole life) or the page-fault handler's socket (`Uffd`).
    pub backend_path: PathBuf,
}

/// `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped on demand.
    File,
    /// A userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// `NetworkOverride`: a new TAP for one interface on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    /// The interface in the snapshot.
    pub iface_id: String,
    /// The TAP to back it with now.
    pub host_dev_name: String,
}

/// `VsockOverride`: a new vsock socket path on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    /// The new path.
    pub uds_path: PathBuf,
}

/// An error body (`Error`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Firecracker's description of what went wrong.
    #[serde(default)]
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn js<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn optional_fields_are_left_out() {
        assert_eq!(
            js(&MachineConfig::new(2, 512)),
            json!({"vcpu_count": 2, "mem_size_mib": 512})
        );
        assert_eq!(js(&EntropyDevice::default()), json!({}));
        assert_eq!(
            js(&Drive::file("root", "/r.img", true)),
            json!({"drive_id": "root", "is_root_device": false, "is_read_only": true,
                   "path_on_host": "/r.img"})
        );
    }

    #[test]
    fn enum_spellings_match_the_swagger() {
        let mut m = MachineConfig::new(1, 128);
        m.huge_pages = Some(HugePages::Huge2M);
        assert_eq!(js(&m)["huge_pages"], "2M");
        assert_eq!(
            js(&InstanceActionInfo {
                action_type: ActionType::InstanceStart
            }),
            json!({"action_type": "InstanceStart"})
        );
        assert_eq!(
            js(&VmStateUpdate {
                state: VmState::Paused
            }),
            json!({"state": "Paused"})
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "app_name": "Firecracker", "id": "x", "state": "Not started",
            "vmm_version": "1.16.1", "later_field": 1
        }))
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        let l = Logger {
            level: Some(LogLevel::Warning),
            ..Default::default()
        };
        assert_eq!(js(&l), json!({"level": "Warning"}));
    }

    #[test]
    fn snapshot_bodies() {
        let c = SnapshotCreateParams {
            mem_file_path: "/s/mem".into(),
            snapshot_path: "/s/state".into(),
            snapshot_type: Some(SnapshotType::Diff),
        };
        assert_eq!(
            js(&c),
            json!({"mem_file_path": "/s/mem", "snapshot_path": "/s/state", "snapshot_type": "Diff"})
        );
        let mut l = SnapshotLoadParams::from_file("/s/state", "/s/mem");
        assert_eq!(
            js(&l),
            json!({"snapshot_path": "/s/state",
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"}})
        );
        l.resume_vm = Some(true);
        l.network_overrides.push(NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap1".into(),
        });
        l.vsock_override = Some(VsockOverride {
            uds_path: "/r/v.sock".into(),
        });
        assert_eq!(
            js(&l),
            json!({"snapshot_path": "/s/state",
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"},
                   "resume_vm": true,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
                   "vsock_override": {"uds_path": "/r/v.sock"}})
        );
    }

    #[test]
    fn rate_limiters_nest() {
        let n = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
            mtu: None,
            rx_rate_limiter: Some(RateLimiter {
                bandwidth: Some(TokenBucket {
                    size: 1 << 20,
                    one_time_burst: None,
                    refill_time: 100,
                }),
                ops: None,
            }),
            tx_rate_limiter: None,
        };
        assert_eq!(
            js(&n),
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                   "rx_rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}})
        );
    }
}
