//! Which tenants to put to sleep and which sleepers to put into deep sleep, from HAProxy's
//! session counters and what the sleeper remembers. Pure.

use std::collections::BTreeMap;

use crate::tenants::{TenantId, Tenants};

/// One tenant backend's counters from `show stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sessions {
    /// Sessions open now (HAProxy's `scur`), held wakes included.
    pub current: u64,
    /// Seconds since the last session started (`lastsess`, or the worker's uptime when it has
    /// had none); `None`: unknown.
    pub last_secs: Option<u64>,
}

/// The tenants to put to sleep now: managed, not stopped, with an idle timeout, awake for at
/// least that long, with no session open and none started within it. A tenant HAProxy has no
/// counters for is left alone (a backend not loaded yet). `awake_secs` is how long each awake
/// tenant has been awake as far as the agent knows (since it woke, or since the agent started).
pub fn to_sleep(
    tenants: &Tenants,
    default_timeout: Option<u64>,
    sessions: &BTreeMap<String, Sessions>,
    awake_secs: &BTreeMap<TenantId, u64>,
) -> Vec<TenantId> {
    tenants
        .iter()
        .filter_map(|t| {
            let timeout = t.idle_timeout_secs(default_timeout)?;
            let awake = *awake_secs.get(&t.id)?;
            let s = sessions.get(&t.id.backend_name())?;
            let idle = s.last_secs.map_or(awake, |l| l.min(awake));
            (s.current == 0 && idle >= timeout).then(|| t.id.clone())
        })
        .collect()
}

/// Light sleepers (container up, server stopped) whose container should stop too: asleep for
/// `deep_after` seconds or more, and, beyond `max_light`, the longest asleep first.
pub fn to_deepen(
    light_asleep_secs: &BTreeMap<TenantId, u64>,
    deep_after: u64,
    max_light: usize,
) -> Vec<TenantId> {
    let mut by_age: Vec<(&TenantId, u64)> =
        light_asleep_secs.iter().map(|(t, s)| (t, *s)).collect();
    // Longest asleep first; ties by name, so the choice is stable.
    by_age.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let over = by_age.len().saturating_sub(max_light);
    by_age
        .iter()
        .enumerate()
        .filter(|(i, (_, secs))| *i < over || *secs >= deep_after)
        .map(|(_, (t, _))| (*t).clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(json: &str) -> Tenants {
        let mut doc: serde_json::Value = serde_json::from_str(json).unwrap();
        doc["version"] = 1.into();
        crate::tenants::validate(&doc).expect("valid tenants")
    }

    fn id(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn sessions(current: u64, last: Option<u64>) -> Sessions {
        Sessions {
            current,
            last_secs: last,
        }
    }

    #[test]
    fn idle_managed_tenants_past_their_timeout_sleep() {
        let t = tenants(
            r#"{"tenants": {
                "idle": {"managed": {}, "idle_timeout": "60s"},
                "busy": {"managed": {}, "idle_timeout": "60s"},
                "recent": {"managed": {}, "idle_timeout": "60s"},
                "fresh": {"managed": {}, "idle_timeout": "60s"},
                "never": {"managed": {}, "idle_timeout": "never"},
                "default": {"managed": {}},
                "stopped": {"managed": {}, "stopped": true, "idle_timeout": "60s"},
                "ext": {"external": {"address": "127.0.0.1:5432"}},
                "unseen": {"managed": {}, "idle_timeout": "60s"}
            }}"#,
        );
        let mut s = BTreeMap::new();
        for (name, v) in [
            ("idle", sessions(0, Some(61))),
            ("busy", sessions(1, Some(3600))),
            ("recent", sessions(0, Some(10))),
            ("fresh", sessions(0, None)),
            ("never", sessions(0, Some(100_000))),
            ("default", sessions(0, Some(100_000))),
            ("stopped", sessions(0, Some(100_000))),
            ("ext", sessions(0, Some(100_000))),
        ] {
            s.insert(id(name).backend_name(), v);
        }
        let awake: BTreeMap<TenantId, u64> = [
            "idle", "busy", "recent", "fresh", "never", "default", "stopped", "ext", "unseen",
        ]
        .into_iter()
        .map(|n| (id(n), if n == "fresh" { 30 } else { 10_000 }))
        .collect();
        assert_eq!(to_sleep(&t, None, &s, &awake), vec![id("idle")]);
        // The settings' default applies to tenants that set none.
        assert_eq!(
            to_sleep(&t, Some(3600), &s, &awake),
            vec![id("default"), id("idle")]
        );
        // Woken a moment ago: HAProxy's last session may be older, the wake counts.
        let mut just_woken = awake.clone();
        just_woken.insert(id("idle"), 5);
        assert!(to_sleep(&t, None, &s, &just_woken).is_empty());
        // Not awake as far as the agent knows (asleep, waking): nothing to do.
        let mut asleep = awake;
        asleep.remove(&id("idle"));
        assert!(to_sleep(&t, None, &s, &asleep).is_empty());
    }

    #[test]
    fn long_or_surplus_light_sleepers_go_deep() {
        let light: BTreeMap<TenantId, u64> = [("a", 10), ("b", 500), ("c", 20), ("d", 30)]
            .into_iter()
            .map(|(n, s)| (id(n), s))
            .collect();
        assert_eq!(to_deepen(&light, 400, 10), vec![id("b")]);
        assert_eq!(to_deepen(&light, 4000, 2), vec![id("b"), id("d")]);
        assert_eq!(to_deepen(&light, 4000, 0).len(), 4);
        assert!(to_deepen(&BTreeMap::new(), 1, 0).is_empty());
    }
}
