//! Networks: egress policy, published ports, WireGuard egress.

use std::{process::Command, time::Duration};

use hutch_api::ExecBody;
use hutch_types::{ErrorCode, NetworkPolicy};
use libtest_mimic::Failed;

use crate::*;

pub(crate) fn network_policy_is_enforced_and_changeable() -> Result {
    use hutch_net::testbed::{World, INET, LAN, METADATA};
    let world = World::new("dmn");
    let mut daemon = Daemon::start_with(common::private_home(), &["--net-host-netns", &world.host]);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let host_ns = world.host.clone();
    let result = on_rt(async move {
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Open;
        let id = client.create(&req).await.map_err(|e| e.to_string())?.id;
        let inet = format!("http://{INET}:8080/");
        check(
            curl(&client, &id, &inet).await? == ("inet".into(), 0),
            "open: internet unreachable",
        )?;
        // Another daemon (another home) on the same host side starts and reconciles: it
        // leaves this daemon's sandbox network alone.
        let mut other = tokio::task::spawn_blocking(move || {
            let args = ["--net-host-netns", &host_ns, "--net-spares", "0"];
            Daemon::start_with(common::private_home(), &args)
        })
        .await
        .map_err(|e| e.to_string())?;
        other.kill9();
        check(
            curl(&client, &id, &inet).await? == ("inet".into(), 0),
            "another daemon's start took this sandbox's network",
        )?;
        for target in [format!("http://{LAN}:8080/"), format!("http://{METADATA}/")] {
            let (_, rc) = curl(&client, &id, &target).await?;
            check(
                rc == 7,
                format!("open: {target} gave curl exit {rc}, want 7 (rejected at once)"),
            )?;
        }
        // Narrow the policy while it runs: the next connection follows it.
        let elsewhere = NetworkPolicy::Allow {
            cidrs: vec!["198.18.0.0/15".into()],
            ports: vec![],
            domains: vec![],
        };
        client
            .set_network(&id, &elsewhere)
            .await
            .map_err(|e| e.to_string())?;
        check(
            curl(&client, &id, &inet).await?.1 == 7,
            "internet still reachable after narrowing",
        )?;
        let just_inet = NetworkPolicy::Allow {
            cidrs: vec![format!("{INET}/32")],
            ports: vec![8080],
            domains: vec![],
        };
        let info = client
            .set_network(&id, &just_inet)
            .await
            .map_err(|e| e.to_string())?;
        check(info.spec.network == just_inet, "policy not recorded")?;
        check(
            curl(&client, &id, &inet).await?.0 == "inet",
            "allowed CIDR unreachable",
        )?;
        check(
            curl(&client, &id, &format!("http://{LAN}:8080/")).await?.1 == 7,
            "LAN reachable under allow",
        )?;
        let log = client.network_log(&id).await.map_err(|e| e.to_string())?;
        check(
            log.iter().any(|e| e.verdict == "deny" && e.dst == LAN),
            format!("no LAN denial in the log: {log:?}"),
        )?;
        check(
            log.iter().any(|e| e.verdict == "allow" && e.dst == INET),
            "no allowed flow in the log",
        )?;
        // A sandbox without a network has no NIC at all.
        let bare = client
            .create(&spec(&[]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        check(
            sh(&client, &bare, "ls /sys/class/net").await? == "lo",
            "a sandbox without network has a NIC",
        )?;
        let refused = api_code(client.set_network(&bare, &NetworkPolicy::Open).await);
        check(
            refused == Some(ErrorCode::Conflict),
            "a NIC appeared on a sandbox created without one",
        )?;
        destroy_all(&client).await.map_err(Failed::from)?;
        Ok::<_, Failed>([id, bare])
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    let namespaces =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    let leaks = common::leaks(&home);
    let ids = result?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    // Namespaces are host-wide: look for this test's own (others may be running beside it).
    check(
        !ids.iter()
            .any(|id| namespaces.contains(&format!("hutch-{id}"))),
        format!("sandbox namespaces left: {namespaces}"),
    )
}

/// `curl` run in namespace `ns` (the daemon's host side): (body, curl's exit code).
pub(crate) fn curl_in(ns: &str, url: &str) -> Result<(String, i32)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time", "10", url])
        .output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    ))
}

pub(crate) fn published_ports_reach_the_guest_survive_a_restart_and_close_on_rm() -> Result {
    use hutch_net::testbed::World;
    let world = World::new("prt");
    let args = ["--net-host-netns", world.host.as_str()];
    let mut daemon = Daemon::start_with(common::private_home(), &args);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    // Egress: nothing at all. Published ports still work: they are inbound, from the host.
    let id = on_rt(async move {
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Allow {
            cidrs: vec![],
            ports: vec![],
            domains: vec![],
        };
        let id = client.create(&req).await.map_err(|e| e.to_string())?.id;
        sh(
            &client,
            &id,
            "mkdir -p /tmp/www && echo preview > /tmp/www/index.html && cd /tmp/www && \
             (python3 -m http.server 8000 >/dev/null 2>&1 &) && \
             for i in $(seq 100); do curl -s localhost:8000/ >/dev/null && exit 0; sleep 0.2; done; exit 1",
        )
        .await?;
        Ok::<_, Failed>(id)
    })?;
    let result = (|| {
        let client = daemon.client();
        let p = on_rt({
            let (client, id) = (client.clone(), id.clone());
            async move { client.publish_port(&id, 8000, None).await }
        })
        .map_err(|e| e.to_string())?;
        check(
            p.guest_port == 8000 && p.host_addr == "127.0.0.1",
            format!("{p:?}"),
        )?;
        let url = format!("http://127.0.0.1:{}/", p.host_port);
        check(
            curl_in(&world.host, &url)? == ("preview\n".into(), 0),
            "the published port does not serve the guest's page",
        )?;
        // The CLI lists it.
        let listed = hutch(&home).args(["port", &id]).output()?;
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        check(
            listed.trim() == format!("8000 -> 127.0.0.1:{}", p.host_port),
            format!("hutch port lists {listed:?}"),
        )?;

        // A restarted daemon publishes it again, and the sandbox's DNS filter and decision
        // log are back.
        daemon.kill9();
        let home_dir = std::mem::replace(&mut daemon.home, tempfile::tempdir()?);
        daemon = Daemon::start_with(home_dir, &args);
        let client = daemon.client();
        check(
            curl_in(&world.host, &url)? == ("preview\n".into(), 0),
            "the published port is gone after a daemon restart",
        )?;
        let log = on_rt({
            let (client, id) = (client.clone(), id.clone());
            async move {
                let out = client
                    .exec(
                        &id,
                        &ExecBody {
                            argv: vec!["getent".into(), "hosts".into(), "refused.test".into()],
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                check(out.exit_code != Some(0), "an unlisted name resolved")?;
                client
                    .network_log(&id)
                    .await
                    .map_err(|e| Failed::from(e.to_string()))
            }
        })?;
        check(
            log.iter()
                .any(|e| e.domain.as_deref() == Some("refused.test") && e.verdict == "deny"),
            format!("the adopted sandbox's DNS refusal is not logged: {log:?}"),
        )?;

        // Unpublished: closed (curl 7: connection refused).
        let out = hutch(&home)
            .args(["port", &id, "8000", "--remove"])
            .output()?;
        check(out.status.success(), "hutch port --remove failed")?;
        check(
            curl_in(&world.host, &url)?.1 == 7,
            "still open after --remove",
        )?;

        // Published on a chosen port through the CLI; the sandbox destroyed: closed.
        let out = hutch(&home)
            .args(["port", &id, "8000", "--host-port", "18080"])
            .output()?;
        check(
            String::from_utf8_lossy(&out.stdout).trim() == "127.0.0.1:18080",
            format!(
                "hutch port printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            ),
        )?;
        let chosen = "http://127.0.0.1:18080/";
        check(
            curl_in(&world.host, chosen)? == ("preview\n".into(), 0),
            "the chosen host port does not serve the guest's page",
        )?;
        on_rt({
            let (client, id) = (client.clone(), id.clone());
            async move { client.destroy(&id).await }
        })
        .map_err(|e| e.to_string())?;
        check(curl_in(&world.host, chosen)?.1 == 7, "still open after rm")
    })();
    let client = daemon.client();
    let left = on_rt(async move { destroy_all(&client).await });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    reap_orphans();
    let leaks = common::leaks(&home);
    result?;
    left?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))
}

/// An HTTP server in namespace `ns` answering with the client address it sees.
pub(crate) fn http_who(ns: &str, port: u16) {
    use std::io::{Read, Write};
    let l = hutch_net::in_netns(ns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| hutch_net::NetError::Io {
            what: "bind".into(),
            source: e,
        })
    })
    .expect("bind who server");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let who = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{who}",
                who.len()
            );
        }
    });
}

pub(crate) fn wireguard_egress_leaves_through_the_tunnel_or_not_at_all() -> Result {
    use hutch_net::testbed::{wireguard_peer, World, INET};
    use hutch_net::wg::{encode_key, public_key};
    let world = World::new("wgd");
    http_who(&world.inet, 8090);
    let mut daemon = Daemon::start_with(common::private_home(), &["--net-host-netns", &world.host]);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let inet_ns = world.inet.clone();
    let result = on_rt(async move {
        let (sandbox_key, peer_key) = ([3u8; 32], [4u8; 32]);
        // The peer listens on the internet namespace's uplink address.
        let endpoint = "198.51.100.2:51820".to_string();
        let peer = wireguard_peer(
            &inet_ns,
            "wgpeer",
            peer_key,
            public_key(&sandbox_key),
            endpoint.parse().unwrap(),
            "10.99.0.1/24".parse().unwrap(),
            vec!["10.99.0.2/32".parse().unwrap()],
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Open;
        req.spec.wireguard = Some(hutch_types::WireGuardSpec {
            private_key: encode_key(&sandbox_key),
            peer_public_key: encode_key(&public_key(&peer_key)),
            preshared_key: None,
            endpoint,
            address: "10.99.0.2/32".into(),
            allowed_ips: vec!["0.0.0.0/0".into()],
            keepalive: None,
            dns: None,
        });
        let info = client.create(&req).await.map_err(|e| e.to_string())?;
        let id = info.id.clone();
        // The key went in; it never comes back out.
        let shown = client.inspect(&id).await.map_err(|e| e.to_string())?;
        let w = shown
            .spec
            .wireguard
            .clone()
            .ok_or("no tunnel in the spec")?;
        check(
            w.private_key == hutch_types::REDACTED && info.spec.wireguard == Some(w),
            "the tunnel's private key is shown",
        )?;
        let who = format!("http://{INET}:8090/");
        let got = curl(&client, &id, &who).await?;
        check(
            got == ("10.99.0.2".into(), 0),
            format!("traffic did not come out of the tunnel: {got:?}"),
        )?;
        check(
            curl(&client, &id, &format!("http://{INET}:8080/")).await? == ("inet".into(), 0),
            "the internet is unreachable through the tunnel",
        )?;
        drop(peer);
        let (body, rc) = curl(&client, &id, &who).await?;
        check(
            rc != 0 && body.is_empty(),
            format!("with the peer down curl got {body:?} (exit {rc})"),
        )?;
        destroy_all(&client).await.map_err(Failed::from)
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    daemon.kill9();
    reap_orphans();
    let leaks = common::leaks(&home);
    result?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))
}
