//! Freezes the wire format: these exact bytes must keep decoding the same way, and encoding
//! must keep producing them. A failure here means an incompatible protocol change: bump
//! `PROTOCOL_VERSION` and add new golden frames instead of editing these. (Version 2 added
//! `ExecRequest::tty` and `HostMsg::Resize`; version 3 added `HostMsg::Network`; version 4
//! added `HostMsg::Identity`; version 5 added `HostMsg::Trust` and guest-started operations:
//! `GuestMsg::TokenRequest` answered by `HostMsg::Token` or `HostMsg::Refused`, and
//! `ErrorCode::RateLimited`; version 6 added forwarded SSH agent connections: `GuestMsg::SshOpen`,
//! `SshData` and `SshClose` both ways; nothing speaking version 1 or 2 was ever released.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hutch_protocol::{
    decode, encode, Envelope, ErrorCode, ExecRequest, ExitInfo, ExitStatus, GitCredential,
    GuestIdentity, GuestMsg, GuestTrust, Hello, HostMsg, NetworkConfig, OpError, Setup,
    TokenRequest, TtySize, Welcome, GUEST_OP_BIT, MAGIC,
};

fn golden_host() -> Vec<(u32, HostMsg, &'static str)> {
    vec![
        (
            0,
            HostMsg::Hello(Hello {
                magic: MAGIC,
                min_version: 2,
                max_version: 2,
            }),
            "080000000000485443480202",
        ),
        // Version 3.
        (
            0,
            HostMsg::Hello(Hello {
                magic: MAGIC,
                min_version: 3,
                max_version: 3,
            }),
            "080000000000485443480303",
        ),
        // Version 4 (still speaking 3).
        (
            0,
            HostMsg::Hello(Hello {
                magic: MAGIC,
                min_version: 3,
                max_version: 4,
            }),
            "080000000000485443480304",
        ),
        // Version 5 (still speaking 3).
        (
            0,
            HostMsg::Hello(Hello {
                magic: MAGIC,
                min_version: 3,
                max_version: 5,
            }),
            "080000000000485443480305",
        ),
        // Version 6 (still speaking 3).
        (
            0,
            hutch_protocol::handshake::hello(),
            "080000000000485443480306",
        ),
        (
            1,
            HostMsg::Trust(GuestTrust {
                ca_pem: "P".into(),
                git: vec![GitCredential {
                    host: "h".into(),
                    password: "p".into(),
                }],
            }),
            "09000000011001500101680170",
        ),
        // Answers to a guest's request, on the guest's operation id.
        (
            GUEST_OP_BIT | 1,
            HostMsg::Token("ab".into()),
            "09000000818080800811026162",
        ),
        (
            GUEST_OP_BIT | 1,
            HostMsg::Refused(OpError {
                code: ErrorCode::RateLimited,
                message: "x".into(),
            }),
            "09000000818080800812060178",
        ),
        // A forwarded SSH agent connection (version 6), on the guest's operation id.
        (
            GUEST_OP_BIT | 1,
            HostMsg::SshData(b"ok".to_vec()),
            "09000000818080800813026f6b",
        ),
        (GUEST_OP_BIT | 1, HostMsg::SshClose, "06000000818080800814"),
        (
            1,
            HostMsg::Identity(GuestIdentity {
                machine_id: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                sandbox_id: "sb-1".into(),
            }),
            "17000000010f000102030405060708090a0b0c0d0e0f0473622d31",
        ),
        (
            2,
            HostMsg::Network(NetworkConfig {
                mac: [0x06, 0x00, 0xac, 0x10, 0x00, 0x02],
                address: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 2)),
                prefix_len: 30,
                gateway: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1)),
                dns: vec![
                    IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1)),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
            }),
            "2a000000020e0600ac10000200ac1000021e00ac1000010200ac1000010100000000000000000000000000000001",
        ),
        (7, HostMsg::Ping(42), "03000000070b2a"),
        (3, HostMsg::Stdin(b"hi".to_vec()), "050000000303026869"),
        (3, HostMsg::StdinEof, "020000000304"),
        (3, HostMsg::Signal(15), "0300000003051e"),
        (3, HostMsg::Credit(65536), "050000000306808004"),
        (
            9,
            HostMsg::Exec(ExecRequest {
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                timeout_ms: Some(1000),
                ..ExecRequest::shell("true")
            }),
            "20000000090203027368022d630474727565010141016201042f746d7000000101e80700",
        ),
        (
            1,
            HostMsg::Setup(Setup {
                entropy: vec![1, 2, 3],
                unix_secs: 1_700_000_000,
                unix_nanos: 5,
                hostname: "vm".into(),
            }),
            "0f00000001010301020380e2cfaa060502766d",
        ),
        (
            9,
            HostMsg::Exec(ExecRequest {
                tty: Some(TtySize { rows: 24, cols: 80 }),
                ..ExecRequest::new(vec!["bash".into()])
            }),
            "110000000902010462617368000000000000011850",
        ),
        (
            9,
            HostMsg::Resize(TtySize {
                rows: 50,
                cols: 132,
            }),
            "05000000090d328401",
        ),
    ]
}

fn golden_guest() -> Vec<(u32, GuestMsg, &'static str)> {
    vec![
        (
            0,
            GuestMsg::Welcome(Welcome {
                magic: MAGIC,
                version: 2,
                agent: "a".into(),
                kernel_release: "k".into(),
            }),
            "0b000000000048544348020161016b",
        ),
        (
            0,
            GuestMsg::Welcome(Welcome {
                magic: MAGIC,
                version: 3,
                agent: "a".into(),
                kernel_release: "k".into(),
            }),
            "0b000000000048544348030161016b",
        ),
        (
            0,
            GuestMsg::Welcome(Welcome {
                magic: MAGIC,
                version: 4,
                agent: "a".into(),
                kernel_release: "k".into(),
            }),
            "0b000000000048544348040161016b",
        ),
        (
            0,
            GuestMsg::Welcome(Welcome {
                magic: MAGIC,
                version: 5,
                agent: "a".into(),
                kernel_release: "k".into(),
            }),
            "0b000000000048544348050161016b",
        ),
        (
            GUEST_OP_BIT | 1,
            GuestMsg::TokenRequest(TokenRequest {
                audience: "ab".into(),
            }),
            "0900000081808080080b026162",
        ),
        (GUEST_OP_BIT | 1, GuestMsg::SshOpen, "0600000081808080080c"),
        (
            GUEST_OP_BIT | 1,
            GuestMsg::SshData(b"ok".to_vec()),
            "0900000081808080080d026f6b",
        ),
        (GUEST_OP_BIT | 1, GuestMsg::SshClose, "0600000081808080080e"),
        (4, GuestMsg::Started(77), "0300000004034d"),
        (4, GuestMsg::Stdout(b"ok".to_vec()), "050000000404026f6b"),
        (4, GuestMsg::Stderr(vec![]), "03000000040500"),
        (
            4,
            GuestMsg::Exited(ExitInfo {
                status: ExitStatus::Signal(9),
                timed_out: true,
            }),
            "050000000406011201",
        ),
        (5, GuestMsg::FileEnd(300), "040000000509ac02"),
        (6, GuestMsg::Pong(42), "03000000060a2a"),
    ]
}

fn hex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("golden hex")
}

#[test]
fn host_messages_have_frozen_encoding() {
    for (op, msg, wire) in golden_host() {
        assert_eq!(
            hex::encode(encode(op, &msg).unwrap()),
            hex::encode(hex(wire)),
            "{msg:?}"
        );
        let got: Envelope<HostMsg> = decode(&hex(wire)[4..]).unwrap();
        assert_eq!(got, Envelope { op, msg });
    }
}

#[test]
fn guest_messages_have_frozen_encoding() {
    for (op, msg, wire) in golden_guest() {
        assert_eq!(
            hex::encode(encode(op, &msg).unwrap()),
            hex::encode(hex(wire)),
            "{msg:?}"
        );
        let got: Envelope<GuestMsg> = decode(&hex(wire)[4..]).unwrap();
        assert_eq!(got, Envelope { op, msg });
    }
}
