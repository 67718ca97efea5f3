//! The pure planner: (desired tenants, observed world) → `Plan`, plain data that `plan` prints
//! and `reconcile` applies. No I/O here, so every combination is unit-tested.
//!
//! Apply order (DESIGN.md §4): access off for what goes away → servers created/started and
//! ready → config written and HAProxy reloaded (only when the backend set changed) → map
//! entries added → orphan containers removed. A tenant is never routable before its server is.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::instances::{ObservedInstance, RunState};
use crate::tenants::{Instance, ManagedSpec, TenantId, Tenants};

/// What the reconciler found. `None` means "could not be observed" (HAProxy not running, no
/// Docker engine configured): the plan then leaves that part alone instead of guessing.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Managed instances of this installation, by tenant.
    pub instances: Option<BTreeMap<TenantId, ObservedInstance>>,
    /// The config file on disk, if any.
    pub config_on_disk: Option<String>,
    /// The config the running HAProxy was last confirmed to have loaded (None: unknown).
    pub config_loaded: Option<String>,
    /// Whether HAProxy answered on its Runtime API.
    pub haproxy_running: bool,
    /// `show map` of the access map in the running HAProxy.
    pub runtime_access: Option<BTreeMap<String, String>>,
    /// `show map` of the backends map in the running HAProxy.
    pub runtime_backends: Option<BTreeMap<String, String>>,
    /// Managed tenants asleep or waking (the asleep map file): their server is meant to be
    /// down, so it is neither started nor checked here (a client's wake starts it).
    pub asleep: BTreeSet<TenantId>,
}

/// What the rendered files would be for the desired state (computed by the caller, since
/// rendering needs paths and settings; the planner only compares).
#[derive(Debug, Clone, Default)]
pub struct Desired<'a> {
    pub tenants: Option<&'a Tenants>,
    pub config: String,
    pub access: BTreeMap<String, String>,
    pub backends: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum InstanceStep {
    /// No container yet (the volume may exist and is reused).
    Create { tenant: TenantId, spec: ManagedSpec },
    /// The container was made from another spec: replace it, keep the volume.
    Replace { tenant: TenantId, spec: ManagedSpec },
    /// Exists but does not run.
    Start { tenant: TenantId, spec: ManagedSpec },
    /// Runs, but must be checked to accept logins before it is routed (a new backend).
    AwaitReady { tenant: TenantId },
    /// Asked to be stopped (`tenant stop`) but runs.
    Stop { tenant: TenantId },
    /// Not desired as a managed tenant any more: remove the container, keep the data volume.
    Remove { tenant: TenantId },
}

impl InstanceStep {
    pub fn tenant(&self) -> &TenantId {
        match self {
            InstanceStep::Create { tenant, .. }
            | InstanceStep::Replace { tenant, .. }
            | InstanceStep::Start { tenant, .. }
            | InstanceStep::AwaitReady { tenant }
            | InstanceStep::Stop { tenant }
            | InstanceStep::Remove { tenant } => tenant,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MapStep {
    Set { key: String, value: String },
    Del { key: String },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Plan {
    /// Access entries to delete before anything else (tenants disabled or going away).
    pub access_off: Vec<MapStep>,
    /// Instance work; `Remove` steps run last.
    pub instances: Vec<InstanceStep>,
    /// The config file on disk differs from the render.
    pub write_config: bool,
    /// The running HAProxy must reload to get the new backend set.
    pub reload: bool,
    /// Backends map changes in the running HAProxy.
    pub backends_map: Vec<MapStep>,
    /// Access entries to add once backends exist.
    pub access_on: Vec<MapStep>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.access_off.is_empty()
            && self.instances.is_empty()
            && !self.write_config
            && !self.reload
            && self.backends_map.is_empty()
            && self.access_on.is_empty()
    }

    /// One line per step, for people.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.access_off {
            out.push(format!("access: {}", map_step("close", s)));
        }
        for s in &self.instances {
            out.push(match s {
                InstanceStep::Create { tenant, .. } => format!("server: create {tenant}"),
                InstanceStep::Replace { tenant, .. } => {
                    format!("server: replace {tenant} (spec changed; data volume kept)")
                }
                InstanceStep::Start { tenant, .. } => format!("server: start {tenant}"),
                InstanceStep::AwaitReady { tenant } => {
                    format!("server: check {tenant} accepts logins")
                }
                InstanceStep::Stop { tenant } => format!("server: stop {tenant}"),
                InstanceStep::Remove { tenant } => {
                    format!("server: remove {tenant}'s container (data volume kept)")
                }
            });
        }
        if self.write_config {
            out.push("haproxy: write configuration".into());
        }
        if self.reload {
            out.push("haproxy: reload (backend set changed)".into());
        }
        for s in &self.backends_map {
            out.push(format!("backends map: {}", map_step("route", s)));
        }
        for s in &self.access_on {
            out.push(format!("access: {}", map_step("open", s)));
        }
        out
    }
}

fn map_step(verb: &str, s: &MapStep) -> String {
    match s {
        MapStep::Set { key, value } => format!("{verb} {key} ({value})"),
        MapStep::Del { key } => format!("{verb} {key}"),
    }
}

/// Computes the plan. Pure.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut p = Plan::default();
    let config_changed = observed.config_on_disk.as_deref() != Some(desired.config.as_str());
    p.write_config = config_changed;
    p.reload = observed.haproxy_running
        && observed.config_loaded.as_deref() != Some(desired.config.as_str());

    // Access entries to remove: present at runtime but not desired (or with another value).
    if let Some(rt) = &observed.runtime_access {
        for (k, v) in rt {
            if desired.access.get(k) != Some(v) {
                p.access_off.push(MapStep::Del { key: k.clone() });
            }
        }
    }

    if let (Some(tenants), Some(instances)) = (desired.tenants, &observed.instances) {
        let new_backends = new_backends(desired, observed);
        for t in tenants.iter() {
            let Instance::Managed(spec) = &t.instance else {
                continue;
            };
            if t.stopped {
                let runs = instances
                    .get(&t.id)
                    .is_some_and(|o| o.state == Some(RunState::Running));
                if runs {
                    p.instances.push(InstanceStep::Stop {
                        tenant: t.id.clone(),
                    });
                }
                continue;
            }
            let step = match instances.get(&t.id) {
                None
                | Some(ObservedInstance {
                    container: None, ..
                }) => InstanceStep::Create {
                    tenant: t.id.clone(),
                    spec: spec.clone(),
                },
                Some(o) if o.spec.as_ref() != Some(spec) => InstanceStep::Replace {
                    tenant: t.id.clone(),
                    spec: spec.clone(),
                },
                Some(_) if observed.asleep.contains(&t.id) => continue,
                Some(o) if o.state != Some(RunState::Running) => InstanceStep::Start {
                    tenant: t.id.clone(),
                    spec: spec.clone(),
                },
                Some(_) if new_backends.contains(t.id.as_str()) => InstanceStep::AwaitReady {
                    tenant: t.id.clone(),
                },
                Some(_) => continue,
            };
            p.instances.push(step);
        }
        for (id, o) in instances {
            let still_managed = tenants
                .get(id)
                .is_some_and(|t| matches!(t.instance, Instance::Managed(_)));
            if !still_managed && o.container.is_some() {
                p.instances
                    .push(InstanceStep::Remove { tenant: id.clone() });
            }
        }
    }

    if let Some(rt) = &observed.runtime_backends {
        // After a reload HAProxy reads the map file, so runtime edits are only needed without one.
        if !p.reload {
            p.backends_map = map_diff(rt, &desired.backends);
        }
    }
    if let Some(rt) = &observed.runtime_access {
        for (k, v) in &desired.access {
            if rt.get(k) != Some(v) {
                p.access_on.push(MapStep::Set {
                    key: k.clone(),
                    value: v.clone(),
                });
            }
        }
    }
    p
}

/// Tenants whose backend the running HAProxy does not have yet (by the backends map).
fn new_backends<'a>(desired: &'a Desired, observed: &Observed) -> BTreeSet<&'a str> {
    desired
        .backends
        .keys()
        .filter(|k| {
            observed
                .runtime_backends
                .as_ref()
                .is_none_or(|rt| !rt.contains_key(*k))
        })
        .map(String::as_str)
        .collect()
}

fn map_diff(current: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> Vec<MapStep> {
    let mut steps = Vec::new();
    for k in current.keys() {
        if !want.contains_key(k) {
            steps.push(MapStep::Del { key: k.clone() });
        }
    }
    for (k, v) in want {
        if current.get(k) != Some(v) {
            steps.push(MapStep::Set {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::validate;
    use serde_json::json;

    fn id(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn tenants(v: serde_json::Value) -> Tenants {
        validate(&json!({"version": 1, "tenants": v})).unwrap()
    }

    fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The desired maps as the renderer would produce them.
    fn desired<'a>(t: &'a Tenants, config: &str) -> Desired<'a> {
        Desired {
            tenants: Some(t),
            config: config.into(),
            access: t
                .iter()
                .filter(|t| t.routable())
                .map(|t| (t.id.to_string(), "enabled".to_string()))
                .collect(),
            backends: t
                .iter()
                .map(|t| (t.id.to_string(), t.id.backend_name()))
                .collect(),
        }
    }

    fn running(id_: &str, spec: ManagedSpec, state: RunState) -> (TenantId, ObservedInstance) {
        (
            id(id_),
            ObservedInstance {
                tenant: id(id_),
                container: Some(format!("pgs-{id_}")),
                state: Some(state),
                spec: Some(spec),
                volume: Some(format!("pgs-{id_}-data")),
            },
        )
    }

    /// A world that matches `d` exactly.
    fn converged(d: &Desired, instances: Vec<(TenantId, ObservedInstance)>) -> Observed {
        Observed {
            instances: Some(instances.into_iter().collect()),
            config_on_disk: Some(d.config.clone()),
            config_loaded: Some(d.config.clone()),
            haproxy_running: true,
            runtime_access: Some(d.access.clone()),
            runtime_backends: Some(d.backends.clone()),
            asleep: BTreeSet::new(),
        }
    }

    #[test]
    fn a_converged_world_needs_nothing() {
        let t = tenants(json!({
            "a": {"access": "enabled", "managed": {}},
            "b": {"external": {"address": "127.0.0.1:5432"}}}));
        let d = desired(&t, "cfg");
        let o = converged(
            &d,
            vec![running("a", ManagedSpec::default(), RunState::Running)],
        );
        let p = plan(&d, &o);
        assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn a_new_managed_tenant_is_created_then_routed_then_opened() {
        let t = tenants(json!({"a": {"access": "enabled", "managed": {}}}));
        let d = desired(&t, "cfg-with-a");
        let o = Observed {
            instances: Some(BTreeMap::new()),
            config_on_disk: Some("cfg".into()),
            config_loaded: Some("cfg".into()),
            haproxy_running: true,
            runtime_access: Some(BTreeMap::new()),
            runtime_backends: Some(BTreeMap::new()),
            asleep: BTreeSet::new(),
        };
        let p = plan(&d, &o);
        assert_eq!(
            p.instances,
            vec![InstanceStep::Create {
                tenant: id("a"),
                spec: ManagedSpec::default()
            }]
        );
        assert!(p.write_config && p.reload);
        // The reload loads the backends map from the file; no runtime edit is needed for it.
        assert!(p.backends_map.is_empty());
        assert_eq!(
            p.access_on,
            vec![MapStep::Set {
                key: "a".into(),
                value: "enabled".into()
            }]
        );
        assert!(p.access_off.is_empty());
    }

    #[test]
    fn a_disabled_tenant_loses_its_access_entry_without_a_reload() {
        let t =
            tenants(json!({"a": {"access": "disabled", "external": {"address": "127.0.0.1:1"}}}));
        let d = desired(&t, "cfg");
        let mut o = converged(&d, vec![]);
        o.runtime_access = Some(entries(&[("a", "enabled")]));
        let p = plan(&d, &o);
        assert_eq!(p.access_off, vec![MapStep::Del { key: "a".into() }]);
        assert!(!p.reload && !p.write_config && p.access_on.is_empty());
    }

    #[test]
    fn drift_in_maps_is_repaired_without_a_reload() {
        let t = tenants(json!({
            "a": {"access": "enabled", "external": {"address": "127.0.0.1:1"}},
            "b": {"access": "enabled", "external": {"address": "127.0.0.1:2"}}}));
        let d = desired(&t, "cfg");
        let mut o = converged(&d, vec![]);
        o.runtime_access = Some(entries(&[("a", "enabled"), ("x", "enabled")]));
        o.runtime_backends = Some(entries(&[("a", "pgs_a"), ("b", "pgs_zzz")]));
        let p = plan(&d, &o);
        assert!(!p.reload);
        assert_eq!(p.access_off, vec![MapStep::Del { key: "x".into() }]);
        assert_eq!(
            p.access_on,
            vec![MapStep::Set {
                key: "b".into(),
                value: "enabled".into()
            }]
        );
        assert_eq!(
            p.backends_map,
            vec![MapStep::Set {
                key: "b".into(),
                value: "pgs_b".into()
            }]
        );
    }

    #[test]
    fn instance_states_map_to_steps() {
        let spec = ManagedSpec::default();
        let other = ManagedSpec {
            max_connections: Some(50),
            ..ManagedSpec::default()
        };
        let t = tenants(json!({
            "running": {"managed": {}}, "stopped": {"managed": {}}, "unhealthy": {"managed": {}},
            "drifted": {"managed": {}}, "volume_only": {"managed": {}}, "missing": {"managed": {}}}));
        let d = desired(&t, "cfg");
        let mut volume_only = running("volume_only", spec.clone(), RunState::Stopped);
        volume_only.1.container = None;
        volume_only.1.state = None;
        volume_only.1.spec = None;
        let o = converged(
            &d,
            vec![
                running("running", spec.clone(), RunState::Running),
                running("stopped", spec.clone(), RunState::Stopped),
                running("unhealthy", spec.clone(), RunState::Unhealthy),
                running("drifted", other, RunState::Running),
                volume_only,
            ],
        );
        let p = plan(&d, &o);
        let by_tenant: BTreeMap<&str, &InstanceStep> = p
            .instances
            .iter()
            .map(|s| (s.tenant().as_str(), s))
            .collect();
        assert!(!by_tenant.contains_key("running"));
        assert!(matches!(by_tenant["stopped"], InstanceStep::Start { .. }));
        assert!(matches!(by_tenant["unhealthy"], InstanceStep::Start { .. }));
        assert!(matches!(by_tenant["drifted"], InstanceStep::Replace { .. }));
        assert!(matches!(
            by_tenant["volume_only"],
            InstanceStep::Create { .. }
        ));
        assert!(matches!(by_tenant["missing"], InstanceStep::Create { .. }));
        assert_eq!(p.instances.len(), 5);
    }

    #[test]
    fn sleeping_servers_are_neither_started_nor_awaited_but_still_replaced() {
        let spec = ManagedSpec::default();
        let other = ManagedSpec {
            max_connections: Some(50),
            ..ManagedSpec::default()
        };
        let t = tenants(json!({
            "light": {"managed": {}}, "deep": {"managed": {}}, "drifted": {"managed": {}}}));
        let d = desired(&t, "cfg");
        let mut o = converged(
            &d,
            vec![
                running("light", spec.clone(), RunState::Running),
                running("deep", spec.clone(), RunState::Stopped),
                running("drifted", other, RunState::Stopped),
            ],
        );
        // A new backend for each: awake servers would be checked before routing.
        o.runtime_backends = Some(BTreeMap::new());
        o.asleep = ["light", "deep", "drifted"].into_iter().map(id).collect();
        let p = plan(&d, &o);
        assert_eq!(p.instances.len(), 1, "{:?}", p.instances);
        assert!(
            matches!(&p.instances[0], InstanceStep::Replace { tenant, .. } if tenant.as_str() == "drifted")
        );
        // Awake, the same servers are started and awaited.
        o.asleep.clear();
        let p = plan(&d, &o);
        assert_eq!(p.instances.len(), 3, "{:?}", p.instances);
    }

    #[test]
    fn a_running_server_without_a_backend_yet_is_checked_before_it_is_routed() {
        let t = tenants(json!({"a": {"access": "enabled", "managed": {}}}));
        let d = desired(&t, "cfg2");
        let mut o = converged(
            &d,
            vec![running("a", ManagedSpec::default(), RunState::Running)],
        );
        o.runtime_backends = Some(BTreeMap::new());
        o.runtime_access = Some(BTreeMap::new());
        o.config_loaded = Some("cfg1".into());
        let p = plan(&d, &o);
        assert_eq!(
            p.instances,
            vec![InstanceStep::AwaitReady { tenant: id("a") }]
        );
    }

    #[test]
    fn removed_and_moved_tenants_lose_their_container_but_never_their_volume() {
        // "gone" is no longer in the file; "moved" became external.
        let t = tenants(
            json!({"moved": {"access": "enabled", "external": {"address": "127.0.0.1:1"}}}),
        );
        let d = desired(&t, "cfg-new");
        let mut o = converged(
            &d,
            vec![
                running("gone", ManagedSpec::default(), RunState::Running),
                running("moved", ManagedSpec::default(), RunState::Running),
            ],
        );
        o.config_loaded = Some("cfg-old".into());
        o.config_on_disk = Some("cfg-old".into());
        o.runtime_access = Some(entries(&[("gone", "enabled"), ("moved", "enabled")]));
        let p = plan(&d, &o);
        assert_eq!(p.access_off, vec![MapStep::Del { key: "gone".into() }]);
        assert!(p.reload && p.write_config);
        let removed: Vec<&str> = p
            .instances
            .iter()
            .filter_map(|s| match s {
                InstanceStep::Remove { tenant } => Some(tenant.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(removed, vec!["gone", "moved"]);
        assert!(p.describe().iter().any(|l| l.contains("data volume kept")));
    }

    #[test]
    fn an_external_tenant_becoming_managed_gets_a_server_first() {
        let t = tenants(json!({"a": {"access": "enabled", "managed": {}}}));
        let d = desired(&t, "cfg-managed");
        let mut o = converged(&d, vec![]);
        o.config_loaded = Some("cfg-external".into());
        o.config_on_disk = Some("cfg-external".into());
        let p = plan(&d, &o);
        assert!(matches!(p.instances[..], [InstanceStep::Create { .. }]));
        assert!(p.reload);
        assert!(
            p.access_on.is_empty(),
            "access was already open and stays open"
        );
    }

    #[test]
    fn without_haproxy_files_are_written_and_nothing_is_pushed() {
        let t =
            tenants(json!({"a": {"access": "enabled", "external": {"address": "127.0.0.1:1"}}}));
        let d = desired(&t, "cfg");
        let o = Observed {
            instances: None,
            config_on_disk: None,
            ..Observed::default()
        };
        let p = plan(&d, &o);
        assert!(p.write_config);
        assert!(!p.reload);
        assert!(p.access_on.is_empty() && p.access_off.is_empty() && p.backends_map.is_empty());
    }

    #[test]
    fn stopped_tenants_are_stopped_and_not_started() {
        let t = tenants(json!({
            "up": {"managed": {}, "stopped": true},
            "down": {"managed": {}, "stopped": true},
            "never": {"managed": {}, "stopped": true}}));
        let d = desired(&t, "cfg");
        let o = converged(
            &d,
            vec![
                running("up", ManagedSpec::default(), RunState::Running),
                running("down", ManagedSpec::default(), RunState::Stopped),
            ],
        );
        let p = plan(&d, &o);
        assert_eq!(p.instances, vec![InstanceStep::Stop { tenant: id("up") }]);
    }

    #[test]
    fn without_docker_managed_tenants_are_left_alone() {
        let t = tenants(json!({"a": {"managed": {}}}));
        let d = desired(&t, "cfg");
        let mut o = converged(&d, vec![]);
        o.instances = None;
        assert!(plan(&d, &o).instances.is_empty());
    }

    #[test]
    fn an_unknown_loaded_config_means_one_reload() {
        let t = tenants(json!({}));
        let d = desired(&t, "cfg");
        let mut o = converged(&d, vec![]);
        o.config_loaded = None;
        let p = plan(&d, &o);
        assert!(p.reload && !p.write_config);
    }
}
