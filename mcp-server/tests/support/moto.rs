//! moto's S3 server for the archive tests: it enforces Object Lock (a locked version
//! cannot be deleted before its retain-until date) as S3 does.
//!
//! The server comes from PyPI's `moto[server]` in a virtualenv at
//! `<target>/venv-moto` (pinned below 5.2: see [`MOTO`]), made here if missing (`python3 -m venv`, then pip; on Debian
//! that needs the python3-venv package), under a lock file so parallel test binaries
//! make it once. `$MCP_TEST_MOTO_SERVER` names a `moto_server` to use instead.
//! Each [`Moto`] is a server on a free loopback port, killed when it drops.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use mcp_server::config::S3Settings;

/// moto 5.2 answers S3 calls with the wrong XML root element (GetBucketVersioning as
/// `<GetBucketVersioningResponse>`), which boto3 tolerates and the Rust SDK refuses.
pub const MOTO: &str = "moto[server]>=5.1,<5.2";

pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing";

fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_owned)
        .join("venv-moto")
}

/// The `moto_server` executable, installing it on first use.
pub fn moto_server() -> PathBuf {
    if let Some(p) = std::env::var_os("MCP_TEST_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let venv = venv_dir();
    let bin = venv.join("bin/moto_server");
    // Names what was installed; another pin makes a new venv.
    let done = venv.join(".installed");
    let installed = || std::fs::read_to_string(&done).is_ok_and(|s| s.trim() == MOTO);
    if installed() {
        return bin;
    }
    let lock_path = venv.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).expect("create the venv lock file");
    lock.lock().expect("lock the venv");
    if !installed() {
        let _ = std::fs::remove_dir_all(&venv);
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .unwrap_or_else(|e| {
                panic!("python3 -m venv: {e}; install python3 and python3-venv (tests/run does)")
            });
        assert!(
            out.status.success(),
            "python3 -m venv {} failed (install python3-venv; tests/run does): {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", MOTO])
            .output()
            .expect("run pip");
        assert!(
            out.status.success(),
            "pip install 'moto[server]' failed (PyPI must be reachable, or set MCP_TEST_MOTO_SERVER): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::File::create(&done)
            .and_then(|mut f| writeln!(f, "{MOTO}"))
            .expect("mark the venv installed");
    }
    drop(lock);
    bin
}

pub struct Moto {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub endpoint: String,
    runtime: tokio::runtime::Runtime,
    /// A plain S3 client on the server, for what the tests do around the archive.
    pub client: aws_sdk_s3::Client,
}

impl Moto {
    pub fn start() -> Self {
        let bin = moto_server();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let endpoint = format!("http://{addr}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        let moto = Self {
            child: Some(child),
            addr,
            endpoint,
            runtime,
            client: aws_sdk_s3::Client::from_conf(config),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {addr} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Creates a bucket: with Object Lock (which turns versioning on), with versioning
    /// only, or plain.
    pub fn bucket(&self, name: &str, object_lock: bool, versioning: bool) {
        self.block_on(async {
            self.client
                .create_bucket()
                .bucket(name)
                .object_lock_enabled_for_bucket(object_lock)
                .send()
                .await
                .expect("create bucket");
            if versioning && !object_lock {
                self.client
                    .put_bucket_versioning()
                    .bucket(name)
                    .versioning_configuration(
                        VersioningConfiguration::builder()
                            .status(BucketVersioningStatus::Enabled)
                            .build(),
                    )
                    .send()
                    .await
                    .expect("enable versioning");
            }
        });
    }

    pub fn settings(&self, bucket: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.into(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            force_path_style: true,
            prefix: String::new(),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key_file: None,
        }
    }

    /// Kills the server (the archive "goes down").
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
