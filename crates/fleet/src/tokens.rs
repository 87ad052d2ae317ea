//! Fleet-wide API tokens: minted once, stored in etcd by their SHA-256, accepted by every
//! gateway and every host of the fleet.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::{Fleet, FleetError, FleetToken};

/// A token's stored form: its SHA-256, hex (what hosts store for their own tokens too).
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Mints a token limited to `label` (`key=value`; admin without), stores its hash and
/// returns the token (shown once) and its record.
pub async fn create(
    fleet: &Fleet,
    label: Option<String>,
) -> Result<(String, FleetToken), FleetError> {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let token = format!("hutchf_{}", hex::encode(secret));
    let digest = hash(&token);
    let record = FleetToken {
        id: format!("ftok-{}", &digest[..12]),
        label,
    };
    let key = fleet.keys().token(&digest);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            serde_json::to_vec(&record).expect("a token record serialises"),
            None,
        )]);
    let done = fleet
        .client()
        .txn(txn)
        .await
        .map_err(FleetError::etcd("store a token"))?;
    if !done.succeeded() {
        return Err(FleetError::Contention("store a token"));
    }
    Ok((token, record))
}
