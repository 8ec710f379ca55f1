//! The replica role: decide what PGDATA needs, clone or repair it, configure it as a
//! standby of the configured primary.

use crate::config::{Config, Replica};
use crate::pgdata::{self, ReplicaAction};
use crate::signals::Shutdown;
use crate::staging::Staging;
use crate::upstream::{self, Upstream};
use crate::wire::Endpoint;
use crate::{clone, info, standby, warn};
use anyhow::{Context, Result};
use std::time::Duration;

/// How long a restarting standby asks the primary for its identity before starting
/// anyway: a primary that is down must not delay a hot standby's reads.
const PROBE_LIMIT: Duration = Duration::from_millis(500);

pub async fn prepare(config: &Config, replica: &Replica, shutdown: &mut Shutdown) -> Result<()> {
    let upstream = Upstream {
        endpoint: Endpoint::Tcp {
            host: replica.primary_host.clone(),
            port: replica.primary_port,
        },
        user: &config.replication_user,
        password: &replica.password,
        application_name: replica.slot.as_str(),
    };
    let facts = pgdata::inspect(&config.pgdata)
        .with_context(|| format!("cannot inspect PGDATA {}", config.pgdata.display()))?;
    let mut probe = if pgdata::is_standby(&facts) {
        upstream.probe(PROBE_LIMIT).await
    } else {
        None
    };
    let action = pgdata::decide_replica(&facts, probe.as_ref().map(|(_, s)| s.system_identifier))?;
    let staging = Staging::new(&config.pgdata);
    match action {
        ReplicaAction::Start => {
            info!("PGDATA holds a standby of this primary; starting it");
            // The slot may be new (a recreated container has a new host name, so a
            // new default slot) or gone (dropped on the primary): without it the
            // walreceiver cannot stream. The standby still serves reads if this fails.
            if let Some((conn, _)) = probe.as_mut() {
                if let Err(e) = upstream::ensure_slot(conn, replica.slot.as_str()).await {
                    warn!("{e:#}");
                }
            }
        }
        ReplicaAction::FinishStaging => {
            info!("finishing an interrupted move of a completed clone");
            staging.promote()?;
        }
        ReplicaAction::Clone | ReplicaAction::DiscardAndClone => {
            if action == ReplicaAction::DiscardAndClone {
                info!("discarding an interrupted clone");
                clone::stop_leftovers(&staging.data_dir())?;
                staging.discard()?;
            }
            let (mut conn, system) = upstream.wait(replica.wait_timeout, shutdown).await?;
            info!(
                "primary {} is database system {} on timeline {}",
                upstream.endpoint, system.system_identifier, system.timeline
            );
            upstream::ensure_slot(&mut conn, replica.slot.as_str()).await?;
            conn.close().await;
            clone::clone(config, replica, shutdown).await?;
        }
    }
    if let Some((conn, _)) = probe {
        conn.close().await;
    }
    let desired = standby::desired(replica, &config.replication_user, &config.pgdata);
    if standby::apply(&config.pgdata, &desired)? && action == ReplicaAction::Start {
        info!(
            "updated the standby's connection settings for primary {}",
            upstream.endpoint
        );
    }
    Ok(())
}
