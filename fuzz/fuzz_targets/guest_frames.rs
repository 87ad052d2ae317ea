//! Everything a hostile guest can put on the wire after a valid handshake.
//!
//! 1. The raw decoder: `FrameReader` + `decode::<GuestMsg>` over the bytes, frame by frame.
//! 2. The whole host end: a `host::Channel` whose guest answers the Hello with a valid
//!    Welcome and then sends the fuzzer's bytes, while the host runs an exec, a ping and a
//!    file read against it. The host may fail any of them, but must not panic, hang or
//!    allocate beyond its limits, and a closed channel must refuse new operations.
#![no_main]

use std::time::Duration;

use hutch_protocol::{
    decode, encode,
    host::{Channel, ChannelError},
    ExecRequest, FrameReader, GuestMsg, ReadFileRequest, Welcome, MAGIC, MAX_FRAME,
    PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

/// Ignore inputs far larger than a few frames; they only slow the fuzzer down.
const MAX_INPUT: usize = 4 * MAX_FRAME;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        decode_frames(data).await;
        // Bound the work: a hang here is a bug, reported as a crash rather than a stall.
        tokio::time::timeout(Duration::from_secs(5), drive_channel(data))
            .await
            .expect("the host hung on guest input");
    });
});

/// The host-side decoder alone.
async fn decode_frames(data: &[u8]) {
    let mut reader = FrameReader::new(data);
    loop {
        match reader.next_body().await {
            Ok(Some(body)) => {
                assert!(body.len() <= MAX_FRAME);
                if let Ok(env) = decode::<GuestMsg>(body) {
                    // Anything that decodes must survive a round trip. (Not byte for byte:
                    // postcard accepts non-minimal varints, so the bytes may differ.)
                    let again = encode(env.op, &env.msg).expect("re-encode");
                    assert!(again.len() - 4 <= body.len(), "re-encoding grew the frame");
                    assert_eq!(decode::<GuestMsg>(&again[4..]).expect("re-decode"), env);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// The full host end of the channel, fed by the fuzzer.
async fn drive_channel(data: &[u8]) {
    let (host_end, mut guest_end) = tokio::io::duplex(64 * 1024);
    let welcome = Welcome {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        agent: "fuzz".into(),
        kernel_release: "fuzz".into(),
    };
    guest_end
        .write_all(&encode(0, &GuestMsg::Welcome(welcome)).unwrap())
        .await
        .unwrap();
    let chan = Channel::connect(host_end)
        .await
        .expect("a valid Welcome must connect");

    // The guest: the fuzzer's bytes, then hang up. Whatever the host writes back is drained
    // so the host never blocks on a full pipe.
    let input = data.to_vec();
    let guest = tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(guest_end);
        let drain = async {
            let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
        };
        let send = async {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        tokio::join!(drain, send);
    });

    // Ops 1, 2 and 3: the fuzzer can address each of them.
    let exec = async {
        let mut exec = chan.exec(ExecRequest::new(vec!["true".into()])).await?;
        while let Ok(ev) = exec.next_event().await {
            if let hutch_protocol::host::ExecEvent::Exited(_) = ev {
                break;
            }
        }
        Ok::<_, ChannelError>(())
    };
    let ping = chan.ping(7);
    let read = async {
        let mut sink = Vec::new();
        let r = chan
            .read_file(
                ReadFileRequest {
                    path: "/f".into(),
                    max_bytes: 1 << 20,
                },
                &mut sink,
            )
            .await;
        assert!(sink.len() <= 1 << 20);
        r
    };
    let _ = tokio::join!(exec, ping, read);

    // The guest has hung up: the channel must now be closed for good.
    guest.abort();
    match chan.ping(8).await {
        Err(ChannelError::Closed(_)) => {}
        other => panic!("a channel whose guest hung up accepted a new op: {other:?}"),
    }
}
