//! schema.sql is the readable whole of migrations/: it must never drift from what deploys actually apply.

use gateway_tests::{repo_root, sqlite, Postgres};

#[test]
fn schema_sql_is_the_concatenation_of_the_migrations() {
    let root = repo_root();
    let mut migrations: Vec<_> = std::fs::read_dir(root.join("migrations"))
        .expect("migrations dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    migrations.sort();
    assert!(!migrations.is_empty());
    let schema = std::fs::read_to_string(root.join("schema.sql")).expect("schema.sql");
    let mut rest = schema.as_str();
    for migration in &migrations {
        let name = format!("-- migrations/{}\n", migration.file_name().and_then(|n| n.to_str()).unwrap_or_default());
        let body = std::fs::read_to_string(migration).expect("migration");
        let at = rest.find(&name).unwrap_or_else(|| panic!("schema.sql lacks {name}; run scripts/schema.sh"));
        rest = &rest[at + name.len()..];
        assert!(rest.starts_with(&body), "schema.sql is stale for {name}; run scripts/schema.sh");
        rest = &rest[body.len()..];
    }
    assert!(rest.trim().is_empty(), "schema.sql has content no migration has; run scripts/schema.sh");
}

#[test]
fn seed_column_names_are_kept() {
    let schema = std::fs::read_to_string(repo_root().join("schema.sql")).expect("schema.sql");
    for column in
        ["key_hash", "user_id", "usage_limit", "active", "model", "input_tokens", "output_tokens", "cost", "created_at"]
    {
        assert!(schema.contains(&format!("  {column} ")), "column {column} missing");
    }
}

/// The columns of each table (name → NOT NULL), as a store reports them; primary keys count as NOT NULL (SQLite
/// does not imply it, but a NULL key cannot be inserted by the gateway either way).
type Tables = std::collections::BTreeMap<String, std::collections::BTreeMap<String, bool>>;

#[test]
fn the_postgres_schema_has_the_d1_schema_s_tables_columns_and_indexes() {
    let root = repo_root();
    // D1: the migrations, applied in order to a fresh SQLite database.
    let dir = std::env::temp_dir().join(format!("schema-parity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let d1 = dir.join("d1.sqlite");
    std::fs::write(&d1, b"").expect("file");
    let mut migrations: Vec<_> = std::fs::read_dir(root.join("migrations"))
        .expect("migrations")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    migrations.sort();
    for migration in &migrations {
        sqlite(&d1, &std::fs::read_to_string(migration).expect("migration"));
    }
    let mut d1_tables = Tables::new();
    for table in sqlite(&d1, "SELECT name FROM sqlite_master WHERE type = 'table'") {
        let table = table["name"].as_str().expect("name").to_owned();
        let columns = sqlite(&d1, &format!("PRAGMA table_info({table})"));
        let columns = columns
            .iter()
            .map(|c| (c["name"].as_str().expect("name").to_owned(), c["notnull"] == 1 || c["pk"] != 0))
            .collect();
        d1_tables.insert(table, columns);
    }
    let d1_indexes: Vec<String> =
        sqlite(&d1, "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name")
            .iter()
            .map(|r| r["name"].as_str().expect("name").to_owned())
            .collect();

    // Postgres: migrations-postgres/, applied by scripts/postgres.mjs as a deploy applies them.
    let pg = Postgres::start(&dir.join("postgres"), 0);
    let mut pg_tables = Tables::new();
    for c in pg.query(
        "SELECT table_name, column_name, is_nullable FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> 'schema_migrations'",
    ) {
        pg_tables
            .entry(c["table_name"].as_str().expect("table").to_owned())
            .or_default()
            .insert(c["column_name"].as_str().expect("column").to_owned(), c["is_nullable"] == "NO");
    }
    let pg_indexes: Vec<String> = pg
        .query("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key' ORDER BY indexname")
        .iter()
        .map(|r| r["indexname"].as_str().expect("name").to_owned())
        .collect();
    pg.stop();
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(
        pg_tables, d1_tables,
        "the same tables and columns, NOT NULL alike (add the Postgres twin of a D1 migration)"
    );
    assert_eq!(pg_indexes, d1_indexes, "the same indexes");
}
