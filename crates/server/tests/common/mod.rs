//! The server test suites' shared set-up: the default model, loaded once per process, served on
//! an ephemeral loopback port.
#![allow(dead_code)] // each suite uses a different subset

use camelid_engine::scheduler::SchedulerConfig;
use camelid_model::{catalog, Model};
use camelid_server::ServerConfig;
use candle_core::Device;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

pub const MODEL_ID: &str = "smollm2-135m-instruct";

pub fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let entry = catalog::find(catalog::DEFAULT_MODEL).expect("default model");
            let path = catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull SmolLM2");
            Arc::new(Model::load(&path, &Device::Cpu).expect("load SmolLM2"))
        })
        .clone()
}

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(scheduler: SchedulerConfig) -> Self {
        Self::start_with_key(scheduler, None)
    }

    /// A server whose `/v1/` routes need `Authorization: Bearer <api_key>` when it is given.
    pub fn start_with_key(scheduler: SchedulerConfig, api_key: Option<&str>) -> Self {
        let api_key = api_key.map(str::to_string);
        let model = model();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send");
                let config = ServerConfig {
                    model_id: MODEL_ID.into(),
                    scheduler,
                    max_n: 8,
                    api_key,
                };
                camelid_server::serve(listener, model, config, async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
            });
        });
        Self {
            addr: addr_rx.recv().expect("server address"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Asks for shutdown; returns the thread to join once draining is observed.
    pub fn begin_shutdown(&mut self) -> std::thread::JoinHandle<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread.take().expect("running")
    }
}
