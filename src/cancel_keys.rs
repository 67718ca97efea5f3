//! Cancel keys across HAProxy reloads. Every tenant backend records the key its server issues
//! (BackendKeyData) in the stick table `pgs-cancel-keys` with the server's id. A new worker
//! starts with an empty table, and the old one empties its own as it stops (while it still
//! serves the sessions those keys belong to), so the agent reads the table just before each
//! reload it makes and writes it into the new worker right after: a query started before a
//! reload can be cancelled after it. It never invents or changes an entry.

use std::collections::BTreeMap;

use crate::haproxy::runtime::{Command, RuntimeApi, RuntimeError};

/// The stick table the rendered configuration declares for cancel keys.
pub const TABLE: &str = "pgs-cancel-keys";

/// `key → server id` from a `show table` reply (entries without a server id are skipped).
pub fn parse_table(body: &str) -> BTreeMap<String, u32> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut key = None;
            let mut id = None;
            for field in l.split_whitespace() {
                if let Some(k) = field.strip_prefix("key=") {
                    key = Some(k.to_string());
                } else if let Some(v) = field.strip_prefix("server_id=") {
                    id = v.parse::<u32>().ok().filter(|&v| v > 0);
                }
            }
            Some((key?, id?))
        })
        .collect()
}

/// The current worker's keys (read just before a reload).
pub async fn snapshot(api: &RuntimeApi) -> Result<BTreeMap<String, u32>, RuntimeError> {
    let cmd = Command::ShowTable {
        table: TABLE.to_string(),
    };
    Ok(parse_table(&api.execute(&cmd).await?))
}

/// Writes into the current worker the keys of `keys` it lacks; how many.
pub async fn restore(
    api: &RuntimeApi,
    keys: &BTreeMap<String, u32>,
) -> Result<usize, RuntimeError> {
    let current = snapshot(api).await?;
    let commands: Vec<Command> = keys
        .iter()
        .filter(|(k, _)| !current.contains_key(*k))
        .map(|(key, &server_id)| Command::SetTableServerId {
            table: TABLE.to_string(),
            key: key.clone(),
            server_id,
        })
        .collect();
    api.batch_all(&commands).await?;
    Ok(commands.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_dumps_parse_to_keys_and_server_ids() {
        let body = "# table: pgs-cancel-keys, type: string, size:100000, used:3\n\
            0x55eb7d2f0040: key=0000652AA46098C5 use=0 exp=86243841 server_id=1174237615 server_key=acme\n\
            0x55eb7d418890: key=ABCDEF01 use=0 exp=86399879 server_id=0 server_key=-\n\
            0x55eb7d418891: key=00001111 use=0 exp=1 server_id=7\n";
        let t = parse_table(body);
        assert_eq!(t.len(), 2);
        assert_eq!(t["0000652AA46098C5"], 1_174_237_615);
        assert_eq!(t["00001111"], 7);
    }
}
