//! Key administration and usage read-out over HTTP: the key lifecycle (limit changes and revocation reaching the
//! limiter at once), pagination, usage aggregation and CSV export, admin auth, allowed models, bad input, the
//! owner's view, and the `npm run keys` CLI.
//!
//! Every test runs on both stores, D1 (`d1::…`) and PostgreSQL (`postgres::…`): the tests are in
//! tests/tests/stores/admin.rs, included once per store.

mod d1 {
    const STORE: gateway_tests::Store = gateway_tests::Store::D1;
    include!("stores/admin.rs");
}

mod postgres {
    const STORE: gateway_tests::Store = gateway_tests::Store::Postgres;
    include!("stores/admin.rs");
}
