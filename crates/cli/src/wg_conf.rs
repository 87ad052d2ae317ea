//! `hutch create --wireguard FILE`: a `wg-quick` configuration turned into the spec's tunnel.

use std::net::{SocketAddr, ToSocketAddrs};

use hutch_types::WireGuardSpec;

use crate::error::CliError;

fn bad(path: &str, why: String) -> CliError {
    CliError::Usage(format!("{path}: {why}"))
}

/// Parses a `wg-quick` file with one `[Interface]` and one `[Peer]`. Keys that would run
/// commands or that Hutch does not apply (`PostUp`, `Table`, `ListenPort`, …) are refused.
pub fn parse(path: &str, text: &str) -> Result<WireGuardSpec, CliError> {
    let (mut private_key, mut address, mut dns) = (None, None, None);
    let (mut public_key, mut psk, mut endpoint, mut allowed, mut keepalive) =
        (None, None, None, None, None);
    let mut section = "";
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = match line {
                "[Interface]" => "interface",
                "[Peer]" if section != "peer" => "peer",
                _ => return Err(bad(path, format!("line {}: unexpected {line}", n + 1))),
            };
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(bad(path, format!("line {}: not KEY = VALUE", n + 1)));
        };
        let (k, v) = (k.trim(), v.trim().to_string());
        let first = || v.split(',').next().unwrap_or("").trim().to_string();
        match (section, k) {
            ("interface", "PrivateKey") => private_key = Some(v),
            ("interface", "Address") => {
                address = v
                    .split(',')
                    .map(str::trim)
                    .find(|a| !a.contains(':'))
                    .map(str::to_string)
            }
            ("interface", "DNS") => dns = Some(first()),
            ("peer", "PublicKey") => public_key = Some(v),
            ("peer", "PresharedKey") => psk = Some(v),
            ("peer", "Endpoint") => endpoint = Some(v),
            ("peer", "AllowedIPs") => {
                allowed = Some(v.split(',').map(|s| s.trim().to_string()).collect())
            }
            ("peer", "PersistentKeepalive") => {
                keepalive =
                    Some(v.parse().map_err(|_| {
                        bad(path, format!("line {}: PersistentKeepalive {v:?}", n + 1))
                    })?)
            }
            _ => return Err(bad(path, format!("line {}: {k} is not supported", n + 1))),
        }
    }
    let need = |v: Option<String>, what: &str| v.ok_or_else(|| bad(path, format!("no {what}")));
    let endpoint = need(endpoint, "Endpoint")?;
    // A host name is resolved here, once: the tunnel is pinned to one IPv4 address.
    let endpoint: SocketAddr = endpoint
        .to_socket_addrs()
        .map_err(|e| bad(path, format!("Endpoint {endpoint}: {e}")))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| bad(path, format!("Endpoint {endpoint} has no IPv4 address")))?;
    Ok(WireGuardSpec {
        private_key: need(private_key, "PrivateKey")?,
        peer_public_key: need(public_key, "PublicKey")?,
        preshared_key: psk,
        endpoint: endpoint.to_string(),
        address: need(address, "IPv4 Address")?,
        allowed_ips: allowed.unwrap_or_else(|| vec!["0.0.0.0/0".into()]),
        keepalive,
        dns,
    })
}

/// Reads and parses `path`.
pub fn load(path: &str) -> Result<WireGuardSpec, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {path}: {e}")))?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_quick_files_parse_and_scripts_are_refused() {
        let conf = "[Interface]\nPrivateKey = cHJpdg==\nAddress = 10.9.0.2/32, fd00::2/128\n\
                    DNS = 10.9.0.1\n\n[Peer] # the server\nPublicKey = cHVi\n\
                    Endpoint = 203.0.113.5:51820\nAllowedIPs = 0.0.0.0/0, ::/0\n\
                    PersistentKeepalive = 25\n";
        let w = parse("t", conf).unwrap();
        assert_eq!(w.private_key, "cHJpdg==");
        assert_eq!(w.address, "10.9.0.2/32");
        assert_eq!(w.endpoint, "203.0.113.5:51820");
        assert_eq!(w.allowed_ips, vec!["0.0.0.0/0", "::/0"]);
        assert_eq!(
            (w.keepalive, w.dns.as_deref()),
            (Some(25), Some("10.9.0.1"))
        );
        let with_script = format!("{conf}[Interface]\nPostUp = rm -rf /\n");
        assert!(parse("t", &with_script).is_err());
        assert!(parse("t", "[Interface]\nPostUp = true\n").is_err());
        assert!(parse("t", "[Interface]\nPrivateKey = x\n").is_err());
    }
}
