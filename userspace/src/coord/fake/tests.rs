//! The failing store fails a claim batch the way a full disk fails the
//! embedded store's: whole, nothing of it applied.

use super::{FaultyStore, StoreFault};
use crate::{
    coord::{CoordError, CoordStore as _},
    plan::Group,
    testing::ready,
};

#[test]
fn a_failed_claim_batch_claims_nothing_and_the_next_one_goes_through() {
    let s = FaultyStore::new();
    ready(s.init("kv", &[(Group::ALL, String::new())])).unwrap();
    let before = ready(s.groups("kv")).unwrap();
    let owners = ["a".to_owned(), "b".to_owned()];
    let units = [0x0010, 0x8000];

    s.fail_once(StoreFault::Claim);
    let e = ready(s.claim_units("kv", &units, 256, &owners, 0)).unwrap_err();
    assert!(matches!(e, CoordError::Io { .. }), "{e}");
    assert_eq!(ready(s.groups("kv")).unwrap(), before, "nothing applied");

    // A claim is a write of its own kind: an armed move leaves it alone.
    s.fail_once(StoreFault::Move);
    let b = ready(s.claim_units("kv", &units, 256, &owners, 0)).unwrap();
    let got: Vec<String> = b.claimed.iter().map(|(g, o)| format!("{g}->{o}")).collect();
    assert_eq!(got, ["0x0000/8->a", "0x8000/8->b"]);
    assert_eq!(
        b.owners,
        [Some("a".to_owned()), Some("b".to_owned())],
        "each unit's owner"
    );
}
