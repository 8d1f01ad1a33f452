//! A scaler for the agent to stream to: acknowledges every report, keeps
//! the newest snapshot it can rebuild, and sends the directives a test
//! scripts (all of them again on every change, as standing state).

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use gpuscale_proto::{AgentReport, Directive};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub struct TestScaler {
    pub url: String,
    script: Arc<watch::Sender<Vec<Directive>>>,
    reports: Arc<Mutex<u64>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for TestScaler {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

#[derive(Clone)]
struct Service {
    script: watch::Receiver<Vec<Directive>>,
    reports: Arc<Mutex<u64>>,
}

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<v1::ScalerDirective, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Service {
    type ReportStream = DirectiveStream;

    async fn report(
        &self,
        request: Request<Streaming<v1::NodeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mut script = self.script.clone();
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let mut send_script = true;
            loop {
                if send_script {
                    let directives = script.borrow_and_update().clone();
                    for d in &directives {
                        if tx.send(Ok(d.into())).await.is_err() {
                            return;
                        }
                    }
                    send_script = false;
                }
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(msg)) => {
                            let report = AgentReport::try_from(msg).expect("the agent sends valid reports");
                            *reports.lock().expect("reports") += 1;
                            if tx.send(Ok((&Directive::Ack { seq: report.seq }).into())).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    },
                    changed = script.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        send_script = true;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl TestScaler {
    pub async fn start() -> TestScaler {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (script, rx) = watch::channel(Vec::new());
        let reports = Arc::new(Mutex::new(0));
        let service = Service {
            script: rx,
            reports: reports.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        TestScaler {
            url: format!("http://{addr}"),
            script: Arc::new(script),
            reports,
            task: Arc::new(task),
        }
    }

    /// Replaces the standing directives (sent at once on the open stream).
    pub fn direct(&self, directives: Vec<Directive>) {
        self.script.send_replace(directives);
    }

    pub fn reports(&self) -> u64 {
        *self.reports.lock().expect("reports")
    }
}
