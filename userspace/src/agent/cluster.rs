//! Joining the cluster (`cluster.store = "etcd"`): the services checked
//! against the cluster's, the instances given cluster-wide ids, the host's
//! lease taken and kept.

use std::{path::Path, sync::Arc};

use crate::{
    config::{Config, Service},
    coord::{CoordError, EtcdOptions, EtcdStore, HostRecord},
};

/// This host's membership of the cluster.
pub struct Cluster {
    pub store: Arc<EtcdStore>,
    /// This host's name (`cluster.host`).
    pub host: String,
}

/// What every host must configure alike for `s`: how its packets are
/// recognised and keyed, and how its elements act. Instances differ by
/// host and are left out.
#[must_use]
pub fn service_spec(s: &Service) -> serde_json::Value {
    serde_json::json!({
        "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": s.ports,
        "protocols": s.protocols.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>(),
        "vlan": s.vlan,
        "tag": format!("{:?}", s.tag),
        "pin": format!("{:?}", s.pin),
        "pin_idle_secs": s.pin_idle_secs,
        "assign": if s.on_demand { "on-demand" } else { "even" },
        "wlm": format!("{:?}", s.wlm),
    })
}

impl Cluster {
    /// Connects to etcd, checks this host's services against the
    /// cluster's, registers its instances and joins under `cluster.host`
    /// (taking the lease over from this host's previous agent, whose id
    /// is kept beside the state file).
    pub async fn join(config: &Config, state: &Path) -> Result<Self, CoordError> {
        let c = &config.cluster;
        let store = EtcdStore::connect(&EtcdOptions {
            endpoints: c.etcd_endpoints.clone(),
            cluster: c.name.clone(),
            timeout: c.etcd_timeout,
        })
        .await?;
        let me = Self {
            store: Arc::new(store),
            host: c.host.clone(),
        };
        me.check(config).await?;
        let underlay = c
            .underlay
            .expect("the config check requires an underlay with etcd");
        me.store
            .join(
                &HostRecord {
                    name: c.host.clone(),
                    underlay,
                    instances: instance_names(config),
                },
                c.lease_ttl,
                &lease_file(state),
            )
            .await?;
        Ok(me)
    }

    /// Checks `config`'s services against the cluster's, and that no other
    /// host is live: delivering to instances on other hosts is not built
    /// yet, so a second host would have its groups taken.
    pub async fn check(&self, config: &Config) -> Result<(), CoordError> {
        let specs: Vec<(String, serde_json::Value)> = config
            .services
            .iter()
            .map(|s| (s.name.clone(), service_spec(s)))
            .collect();
        self.store.check_services(&self.host, &specs).await?;
        let others: Vec<String> = self
            .store
            .hosts()
            .await?
            .into_keys()
            .filter(|h| *h != self.host)
            .collect();
        if !others.is_empty() {
            return Err(CoordError::OneHostOnly {
                others: others.join(", "),
            });
        }
        Ok(())
    }

    /// The cluster-wide ids of `config`'s instances, as (id, name), for the
    /// plan to keep; new instances are registered.
    pub async fn registry(&self, config: &Config) -> Result<Vec<(u32, String)>, CoordError> {
        let names = instance_names(config);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let ids = self.store.register_instances(&self.host, &refs).await?;
        Ok(ids.into_iter().zip(names).collect())
    }
}

fn instance_names(config: &Config) -> Vec<String> {
    config
        .services
        .iter()
        .flat_map(|s| &s.instances)
        .map(|i| i.name.clone())
        .collect()
}

/// Where the host's lease id is kept: beside the state file.
#[must_use]
pub fn lease_file(state: &Path) -> std::path::PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".lease");
    p.into()
}
