//! schema.sql is the readable whole of migrations/: it must never drift from what deploys actually apply.

use gateway_tests::repo_root;

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
