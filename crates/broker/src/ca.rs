//! The per-sandbox certificate authority: the guest trusts its certificate, the broker mints
//! leaf certificates from it for the hosts it terminates. Its key never leaves the host.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::BrokerError;

/// Certificates start a day in the past so a guest whose clock lags still accepts them.
const BACKDATE: Duration = Duration::days(1);
/// How long the CA is valid: longer than any sandbox lives.
const CA_LIFETIME: Duration = Duration::days(397);
/// How long a leaf is valid.
const LEAF_LIFETIME: Duration = Duration::days(30);
/// Leaves cached per CA; the cache starts over when full (a guest naming endless hosts only
/// costs itself signatures).
const LEAF_CACHE: usize = 1024;

/// A sandbox's own CA: ECDSA P-256, path length 0, backdated, and name-constrained to the
/// hosts the sandbox's secrets are bound to (IP addresses excluded), so even a stolen
/// certificate could only vouch for those names.
pub struct SandboxCa {
    /// The issuer leaves are signed as (the CA itself, or one re-made from its key and name).
    cert: rcgen::Certificate,
    /// The CA certificate the guest trusts, exactly as first minted.
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// One key for every leaf this CA mints (host-side only).
    leaf_key: Arc<dyn rustls::sign::SigningKey>,
    leaf_key_pair: KeyPair,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("cert", &"<pem>")
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SandboxCa {
    /// Generates a CA named after `sandbox_id`. `hosts` (canonical DNS names) become its
    /// permitted name constraints; empty: unconstrained names (IP addresses are always
    /// excluded).
    pub fn generate(sandbox_id: &str, hosts: &[String]) -> Result<SandboxCa, BrokerError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = Self::params(sandbox_id, hosts)?.self_signed(&key)?;
        let (pem, der) = (cert.pem(), cert.der().clone());
        Self::from_parts(cert, pem, der, key)
    }

    /// The CA of sandbox `sandbox_id` as [`SandboxCa::cert_pem`] and [`SandboxCa::key_pem`]
    /// gave it (a restarted daemon taking its sandboxes back): leaves are signed under the
    /// same name and key, so the guest's trust in the original certificate holds.
    pub fn from_pem(
        sandbox_id: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<SandboxCa, BrokerError> {
        use rustls::pki_types::pem::PemObject;
        let key = KeyPair::from_pem(key_pem)?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| BrokerError::BadCa(e.to_string()))?;
        let issuer = Self::params(sandbox_id, &[])?.self_signed(&key)?;
        Self::from_parts(issuer, cert_pem.to_string(), der, key)
    }

    /// The CA's private key (PKCS#8 PEM), for the daemon's 0600 file; never for the guest.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    fn params(sandbox_id: &str, hosts: &[String]) -> Result<CertificateParams, BrokerError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Hutch sandbox {sandbox_id} CA"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Hutch");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: hosts
                .iter()
                .map(|h| GeneralSubtree::DnsName(h.clone()))
                .collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([0; 4], 0)),
                GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix([0; 16], 0)),
            ],
        });
        Ok(params)
    }

    fn from_parts(
        cert: rcgen::Certificate,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
    ) -> Result<SandboxCa, BrokerError> {
        let leaf_key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let der = Zeroizing::new(leaf_key_pair.serialize_der());
        let leaf_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(der.as_slice()),
        ))?;
        Ok(SandboxCa {
            cert,
            cert_pem,
            cert_der,
            key,
            leaf_key,
            leaf_key_pair,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM) the guest installs into its trust stores.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The leaf for `host` (canonical), minted on first use and cached.
    pub(crate) fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, BrokerError> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(leaf) = leaves.get(host) {
            return Ok(leaf.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        let leaf = params.signed_by(&self.leaf_key_pair, &self.cert, &self.key)?;
        let certified = Arc::new(CertifiedKey::new(
            vec![leaf.der().clone(), self.cert_der.clone()],
            self.leaf_key.clone(),
        ));
        if leaves.len() >= LEAF_CACHE {
            leaves.clear();
        }
        leaves.insert(host.to_string(), certified.clone());
        Ok(certified)
    }
}

/// Hands rustls the leaf for the ClientHello's SNI.
#[derive(Debug)]
pub(crate) struct LeafResolver(pub(crate) Arc<SandboxCa>);

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hutch_types::canonical_host(hello.server_name()?)?;
        self.0
            .leaf(&host)
            .map_err(|e| tracing::warn!(%host, error = %e, "minting a leaf certificate"))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn verify(ca: &SandboxCa, host: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let leaf = ca.leaf(host).unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn leaves_verify_only_inside_the_name_constraints() {
        let ca = SandboxCa::generate("sb1", &["api.example.test".into()]).unwrap();
        verify(&ca, "api.example.test").unwrap();
        assert!(verify(&ca, "evil.example.test").is_err());
        assert!(Arc::ptr_eq(
            &ca.leaf("api.example.test").unwrap(),
            &ca.leaf("api.example.test").unwrap()
        ));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn a_ca_read_back_from_its_pem_signs_leaves_the_original_verifies() {
        let first = SandboxCa::generate("sb2", &[]).unwrap();
        let again = SandboxCa::from_pem("sb2", &first.cert_pem(), &first.key_pem()).unwrap();
        assert_eq!(again.cert_der(), first.cert_der());
        // Trusting only the original certificate, as the guest does.
        verify(&first, "x.test").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let leaf = again.leaf("api.example.test").unwrap();
        let name = ServerName::try_from("api.example.test").unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now())
            .unwrap();
        assert!(SandboxCa::from_pem("sb2", "junk", &first.key_pem()).is_err());
    }

    #[test]
    fn every_ca_is_its_own() {
        let a = SandboxCa::generate("a", &[]).unwrap();
        let b = SandboxCa::generate("a", &[]).unwrap();
        assert_ne!(a.cert_der(), b.cert_der());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(a.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let leaf = b.leaf("x.test").unwrap();
        let name = ServerName::try_from("x.test").unwrap();
        assert!(verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now())
            .is_err());
    }
}
