//! The README's supported-models table is generated from the family registry.
//! `CAMELID_BLESS=1 cargo test --release --test readme_table` rewrites it.

use std::path::PathBuf;

const START: &str = "<!-- supported-models:start (generated from the family registry) -->\n";
const END: &str = "<!-- supported-models:end -->";

#[test]
fn readme_table_matches_registry() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let table = camelid_model::families::markdown_table();
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        panic!("README.md lacks the supported-models markers");
    };
    let current = &readme[a + START.len()..b];
    if current != table {
        if std::env::var_os("CAMELID_BLESS").is_some() {
            let new = format!("{}{}{}{}", &readme[..a], START, table, &readme[b..]);
            std::fs::write(&path, new).expect("write README.md");
        } else {
            panic!("README supported-models table is stale; rerun with CAMELID_BLESS=1\n{table}");
        }
    }
}
