//! systemd over D-Bus (zbus): unit and timer state, start/restart/stop jobs and their completion, state-change signals.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use serde::Serialize;
use zbus::zvariant::OwnedObjectPath;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "cannot connect to the system bus: {0} (is dbus running, and DBUS_SYSTEM_BUS_ADDRESS right?)"
    )]
    Connect(zbus::Error),
    #[error("{op} {unit}: {source}")]
    Call {
        op: &'static str,
        unit: String,
        source: zbus::Error,
    },
    #[error("{unit:?} is not a systemd unit name")]
    BadName { unit: String },
    #[error("{op} {unit}: no answer from systemd within {timeout:?}")]
    Timeout {
        op: &'static str,
        unit: String,
        timeout: Duration,
    },
}

pub type Result<T> = std::result::Result<T, SystemdError>;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property, name = "LoadState")]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "ActiveState")]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "SubState")]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "UnitFileState")]
    fn unit_file_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "StateChangeTimestamp")]
    fn state_change_timestamp(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "ActiveEnterTimestamp")]
    fn active_enter_timestamp(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "InactiveEnterTimestamp")]
    fn inactive_enter_timestamp(&self) -> zbus::Result<u64>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "Result")]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "ExecMainStatus")]
    fn exec_main_status(&self) -> zbus::Result<i32>;
    #[zbus(property, name = "ExecMainExitTimestamp")]
    fn exec_main_exit_timestamp(&self) -> zbus::Result<u64>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Timer",
    default_service = "org.freedesktop.systemd1"
)]
trait Timer {
    #[zbus(property, name = "Result")]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property, name = "LastTriggerUSec")]
    fn last_trigger_usec(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "NextElapseUSecRealtime")]
    fn next_elapse_usec_realtime(&self) -> zbus::Result<u64>;
}

/// systemd's microseconds since the epoch; 0 means never.
fn usec(v: u64) -> Option<jiff::Timestamp> {
    if v == 0 {
        return None;
    }
    jiff::Timestamp::from_microsecond(i64::try_from(v).ok()?).ok()
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimerState {
    pub result: String,
    pub last_trigger: Option<jiff::Timestamp>,
    pub next_elapse: Option<jiff::Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnitState {
    pub name: String,
    /// loaded, not-found, masked, error ...
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// enabled, disabled, static, masked, ... ("" for transient units)
    pub unit_file_state: String,
    pub state_change: Option<jiff::Timestamp>,
    pub active_enter: Option<jiff::Timestamp>,
    pub inactive_enter: Option<jiff::Timestamp>,
    /// Services only: success, exit-code, signal, timeout, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_restarts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_main_status: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_main_exit: Option<jiff::Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer: Option<TimerState>,
}

impl UnitState {
    pub fn exists(&self) -> bool {
        self.load_state != "not-found"
    }

    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }

    /// Enabled in some form: wanted at boot or by another unit.
    pub fn is_enabled(&self) -> bool {
        matches!(
            self.unit_file_state.as_str(),
            "enabled"
                | "enabled-runtime"
                | "static"
                | "alias"
                | "indirect"
                | "generated"
                | "linked"
                | "linked-runtime"
        )
    }
}

/// A unit's ActiveState changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitChange {
    pub unit: String,
    pub active_state: String,
}

/// How a start, restart or stop job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobOutcome {
    pub job: String,
    /// done, canceled, timeout, failed, dependency, skipped
    pub result: String,
}

/// Unit names come from baselines and orders: refuse anything systemd would not accept as a name.
pub fn valid_unit_name(name: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".timer",
        ".target",
        ".mount",
        ".path",
        ".slice",
        ".scope",
        ".swap",
        ".device",
        ".automount",
    ];
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
        && SUFFIXES
            .iter()
            .any(|s| name.len() > s.len() && name.ends_with(s))
}

/// A proxy on `path` that reads properties afresh on each call (no cache, no signal subscription).
async fn uncached<'a, T>(conn: &'a zbus::Connection, path: OwnedObjectPath) -> zbus::Result<T>
where
    T: From<zbus::Proxy<'a>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<T>::new(conn)
        .path(path)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// A connection to systemd on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
#[derive(Clone)]
pub struct Systemd {
    conn: zbus::Connection,
}

impl Systemd {
    pub async fn system() -> Result<Self> {
        let conn = zbus::Connection::system()
            .await
            .map_err(SystemdError::Connect)?;
        Ok(Self { conn })
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>> {
        ManagerProxy::new(&self.conn)
            .await
            .map_err(|source| SystemdError::Call {
                op: "connect to",
                unit: "org.freedesktop.systemd1".into(),
                source,
            })
    }

    async fn unit_path(&self, name: &str) -> Result<OwnedObjectPath> {
        if !valid_unit_name(name) {
            return Err(SystemdError::BadName { unit: name.into() });
        }
        self.manager()
            .await?
            .load_unit(name)
            .await
            .map_err(|source| SystemdError::Call {
                op: "LoadUnit",
                unit: name.into(),
                source,
            })
    }

    /// The unit's state, as `systemctl show` would report it.
    pub async fn unit_state(&self, name: &str) -> Result<UnitState> {
        let path = self.unit_path(name).await?;
        let err = |source| SystemdError::Call {
            op: "read",
            unit: name.into(),
            source,
        };
        let unit: UnitProxy<'_> = uncached(&self.conn, path.clone()).await.map_err(err)?;
        let (load_state, active_state, sub_state) = (
            unit.load_state().await.map_err(err)?,
            unit.active_state().await.map_err(err)?,
            unit.sub_state().await.map_err(err)?,
        );
        let mut state = UnitState {
            name: name.into(),
            load_state,
            active_state,
            sub_state,
            unit_file_state: unit.unit_file_state().await.unwrap_or_default(),
            state_change: usec(unit.state_change_timestamp().await.unwrap_or(0)),
            active_enter: usec(unit.active_enter_timestamp().await.unwrap_or(0)),
            inactive_enter: usec(unit.inactive_enter_timestamp().await.unwrap_or(0)),
            result: None,
            n_restarts: None,
            exec_main_status: None,
            exec_main_exit: None,
            timer: None,
        };
        if !state.exists() {
            return Ok(state);
        }
        if name.ends_with(".service") {
            let svc: ServiceProxy<'_> = uncached(&self.conn, path).await.map_err(err)?;
            state.result = svc.result().await.ok();
            state.n_restarts = svc.n_restarts().await.ok();
            state.exec_main_status = svc.exec_main_status().await.ok();
            state.exec_main_exit = svc.exec_main_exit_timestamp().await.ok().and_then(usec);
        } else if name.ends_with(".timer") {
            let timer: TimerProxy<'_> = uncached(&self.conn, path).await.map_err(err)?;
            state.timer = Some(TimerState {
                result: timer.result().await.unwrap_or_default(),
                last_trigger: usec(timer.last_trigger_usec().await.unwrap_or(0)),
                next_elapse: usec(timer.next_elapse_usec_realtime().await.unwrap_or(0)),
            });
        }
        Ok(state)
    }

    /// Starts, restarts or stops `unit` (mode "replace") and waits for the
    /// job to finish, as `systemctl` does: subscribe, queue the job, wait for
    /// its JobRemoved signal.
    pub async fn run_job(&self, op: JobOp, unit: &str, timeout: Duration) -> Result<JobOutcome> {
        if !valid_unit_name(unit) {
            return Err(SystemdError::BadName { unit: unit.into() });
        }
        let manager = self.manager().await?;
        let call_err = |source| SystemdError::Call {
            op: op.method(),
            unit: unit.into(),
            source,
        };
        // Subscribe before queueing so that a fast job's signal is not missed.
        let mut removed = manager.receive_job_removed().await.map_err(call_err)?;
        let job = match op {
            JobOp::Start => manager.start_unit(unit, "replace").await,
            JobOp::Restart => manager.restart_unit(unit, "replace").await,
            JobOp::Stop => manager.stop_unit(unit, "replace").await,
        }
        .map_err(call_err)?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Some(JobOutcome {
                        job: job.to_string(),
                        result: args.result.clone(),
                    });
                }
            }
            None
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(outcome)) => Ok(outcome),
            _ => Err(SystemdError::Timeout {
                op: op.method(),
                unit: unit.into(),
                timeout,
            }),
        }
    }

    /// A stream of ActiveState changes of `units`. The first item for each unit
    /// is its current state.
    pub async fn watch(&self, units: &[String]) -> Result<BoxStream<'static, UnitChange>> {
        // Subscribe makes systemd emit PropertiesChanged for all units.
        let _ = self.manager().await?.subscribe().await;
        let mut streams: SelectAll<BoxStream<'static, UnitChange>> = SelectAll::new();
        for name in units {
            let path = self.unit_path(name).await?;
            let err = |source| SystemdError::Call {
                op: "watch",
                unit: name.clone(),
                source,
            };
            let proxy = UnitProxy::builder(&self.conn)
                .path(path)
                .map_err(err)?
                .build()
                .await
                .map_err(err)?;
            let changes = proxy.receive_active_state_changed().await;
            let unit = name.clone();
            let stream =
                futures_util::stream::unfold((proxy, changes), |(proxy, mut changes)| async move {
                    let change = changes.next().await?;
                    let state = change.get().await.unwrap_or_default();
                    Some((state, (proxy, changes)))
                })
                .map(move |active_state| UnitChange {
                    unit: unit.clone(),
                    active_state,
                });
            streams.push(stream.boxed());
        }
        Ok(streams.boxed())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOp {
    Start,
    Restart,
    Stop,
}

impl JobOp {
    pub fn method(self) -> &'static str {
        match self {
            JobOp::Start => "StartUnit",
            JobOp::Restart => "RestartUnit",
            JobOp::Stop => "StopUnit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names() {
        for ok in [
            "sshd.service",
            "restic-backups-ehr.service",
            "compliance-agent-switch@12.service",
            "clamav-freshclam.timer",
        ] {
            assert!(valid_unit_name(ok), "{ok}");
        }
        for bad in [
            "",
            "sshd",
            ".service",
            "a b.service",
            "../x.service",
            "x.service;reboot",
        ] {
            assert!(!valid_unit_name(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn usec_zero_is_never() {
        assert_eq!(usec(0), None);
        assert_eq!(
            usec(1_700_000_000_000_000).map(|t| t.as_second()),
            Some(1_700_000_000)
        );
    }
}
