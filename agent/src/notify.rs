//! systemd's service notification protocol (sd_notify): READY, STATUS, WATCHDOG, STOPPING.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go: `$NOTIFY_SOCKET`, a path or an abstract name (`@...`).
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the environment systemd sets for `Type=notify` services; a no-op elsewhere.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let bytes = s.as_encoded_bytes();
            match bytes.first() {
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(std::path::PathBuf::from(s))),
                _ => None,
            }
        });
        // WATCHDOG_PID, when set, must be ours.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && for_us)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// Half the watchdog timeout: how often WATCHDOG=1 must be sent.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    pub fn notify(&self, message: &str) {
        let Some(target) = &self.target else { return };
        let Ok(socket) = UnixDatagram::unbound() else {
            return;
        };
        let sent = match target {
            Target::Path(p) => socket.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    pub fn reloading(&self) {
        self.notify("RELOADING=1");
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some(Target::Path(path)),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.ready("score 100%\nall good");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=score 100% all good");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
    }
}
