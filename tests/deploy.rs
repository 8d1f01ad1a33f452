//! The manifests in `deploy/`: every kustomize overlay renders with the
//! `kubectl` CI has (1.32, with kustomize), and the rendered objects are
//! what a cluster needs: kinds, images, least-privilege RBAC, probes,
//! security contexts, flags the binary accepts, TLS and the agents'
//! projected token, NetworkPolicies. `kubectl apply --dry-run=client -k`
//! of every overlay succeeds against the fake API server (which serves
//! discovery for every kind, the Prometheus Operator's and cert-manager's
//! as CRDs). The CRD in `deploy/` is what `gpuscale crd` prints, the
//! example autoscaler is valid, its Deployment declares the readiness gate
//! and runs the engine behind the request proxy, and the self-signed
//! certificates of `deploy/scripts` serve TLS.

mod kustomize;

use std::process::Command;

use kustomize::{docs, kustomize, root, strings};
use serde_json::Value;

fn gpuscale(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .args(args)
        .output()
        .expect("the gpuscale binary runs");
    assert!(
        out.status.success(),
        "gpuscale {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no env {name}"))
}

/// Every `--flag` of `args` is one `gpuscale <subcommand> --help` lists.
fn assert_flags_exist(subcommand: &str, args: &[String]) {
    let help = gpuscale(&[subcommand, "--help"]);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap_or(a);
        assert!(
            help.contains(&format!("{flag} "))
                || help.contains(&format!("{flag}\n"))
                || help.contains(&format!("{flag}="))
                || help.contains(&format!("{flag} <")),
            "`gpuscale {subcommand}` has no flag {flag} (used in the manifests)"
        );
    }
}

#[test]
fn the_crd_in_deploy_is_what_gpuscale_crd_prints() {
    let committed = std::fs::read_to_string(root().join("deploy/base/crd.yaml")).unwrap();
    let printed = gpuscale(&["crd"]);
    assert!(
        committed == printed,
        "deploy/base/crd.yaml is stale: regenerate it with `cargo run -- crd > deploy/base/crd.yaml`"
    );
    let crd = &docs(&printed)[0];
    assert_eq!(crd["spec"]["group"], "autoscaling.gpuscale.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(strings(&crd["spec"]["names"]["shortNames"]), ["ias"]);
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    assert_eq!(
        v["subresources"]["scale"]["labelSelectorPath"],
        ".status.selector"
    );
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("priority").is_none_or(|p| p == 0))
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Target",
            "Min",
            "Max",
            "Desired",
            "Ready",
            "Startup p90",
            "SLO",
            "Age"
        ]
    );
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rules = spec["x-kubernetes-validations"].to_string();
    assert!(
        rules.contains("self.minReplicas <= self.maxReplicas"),
        "{rules}"
    );
    assert_eq!(
        spec["properties"]["maxReplicas"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert!(strings(&spec["required"]).contains(&"target".to_string()));
}

#[test]
fn every_overlay_renders_with_kinds_images_rbac_probes_and_security() {
    for (overlay, tag, scaler_replicas) in [("dev", "latest", 1), ("production", "0.1.0", 2)] {
        let objs = kustomize(&root().join("deploy/overlays").join(overlay));
        let mut kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut expected = vec![
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "DaemonSet",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "PodMonitor",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ];
        if overlay == "production" {
            expected.extend(["Certificate", "Issuer"]);
            expected.sort_unstable();
        }
        assert_eq!(kinds, expected, "{overlay}");
        for o in &objs {
            let cluster_scoped = matches!(
                o["kind"].as_str(),
                Some(
                    "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
                )
            );
            if !cluster_scoped {
                assert_eq!(
                    o["metadata"]["namespace"], "gpuscale-system",
                    "{overlay}: {}",
                    o["metadata"]["name"]
                );
            }
            assert_eq!(
                o["metadata"]["labels"]["app.kubernetes.io/part-of"],
                "gpuscale"
            );
        }
        let crd = find(
            &objs,
            "CustomResourceDefinition",
            "inferenceautoscalers.autoscaling.gpuscale.dev",
        );
        assert_eq!(crd["spec"]["names"]["kind"], "InferenceAutoscaler");

        // The scaler.
        let deploy = find(&objs, "Deployment", "gpuscale-scaler");
        assert_eq!(deploy["spec"]["replicas"], scaler_replicas, "{overlay}");
        let pod = &deploy["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "gpuscale-scaler");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let c = &pod["containers"][0];
        assert_eq!(c["image"], format!("ghcr.io/gpuscale/gpuscale:{tag}"));
        let args = strings(&c["args"]);
        assert_eq!(args[0], "scaler");
        for a in ["--kubernetes", "--leader-elect=true"] {
            assert!(
                args.contains(&a.to_string()),
                "{overlay}: scaler args {args:?}"
            );
        }
        assert_flags_exist("scaler", &args);
        for a in [
            "--tls-cert=/etc/gpuscale/tls/tls.crt",
            "--tls-key=/etc/gpuscale/tls/tls.key",
        ] {
            assert!(args.contains(&a.to_string()), "{overlay}: {args:?}");
        }
        assert!(!args.iter().any(|a| a.contains("insecure")), "{args:?}");
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/etc/gpuscale/tls");
        assert_eq!(
            pod["volumes"][0]["secret"]["secretName"],
            "gpuscale-scaler-tls"
        );
        assert_eq!(
            env_value(c, "GPUSCALE_IDENTITY")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(
            env_value(c, "GPUSCALE_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert!(
            c["resources"]["requests"]["cpu"].is_string()
                && c["resources"]["limits"]["memory"].is_string()
        );
        assert_secure(c, overlay);

        // The agent.
        let ds = find(&objs, "DaemonSet", "gpuscale-agent");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "gpuscale-agent");
        assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
        assert!(
            pod["tolerations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["key"] == "nvidia.com/gpu")
        );
        let c = &pod["containers"][0];
        assert_eq!(c["image"], format!("ghcr.io/gpuscale/gpuscale:{tag}"));
        let args = strings(&c["args"]);
        assert_eq!(args[0], "agent");
        for a in [
            "--scaler=https://gpuscale-scaler.gpuscale-system.svc:7070",
            "--ca-file=/etc/gpuscale/ca/ca.crt",
            "--token-file=/var/run/secrets/gpuscale/token",
        ] {
            assert!(args.contains(&a.to_string()), "{overlay}: {args:?}");
        }
        assert_flags_exist("agent", &args);
        let volume = |name: &str| {
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("no volume {name}"))
                .clone()
        };
        let token = &volume("gpuscale-token")["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "gpuscale");
        assert_eq!(token["path"], "token");
        assert!(token["expirationSeconds"].as_i64().unwrap() <= 3600);
        assert_eq!(volume("ca")["configMap"]["name"], "gpuscale-ca");
        assert_eq!(
            env_value(c, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        assert_eq!(env_value(c, "NVIDIA_VISIBLE_DEVICES")["value"], "all");
        assert_eq!(
            env_value(c, "NVIDIA_DRIVER_CAPABILITIES")["value"],
            "utility,compute"
        );
        assert!(
            !c["resources"].to_string().contains("nvidia.com/gpu"),
            "the agent takes no GPU from the workloads"
        );
        let mount = &c["volumeMounts"][0];
        assert_eq!(mount["mountPath"], "/var/lib/kubelet/pod-resources");
        assert_eq!(mount["readOnly"], true);
        assert_eq!(
            pod["volumes"][0]["hostPath"]["path"],
            "/var/lib/kubelet/pod-resources"
        );
        assert_eq!(pod["volumes"][0]["hostPath"]["type"], "Directory");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_secure(c, overlay);
        if overlay == "production" {
            assert_eq!(pod["runtimeClassName"], "nvidia");
        }

        // RBAC: named resources, named verbs, bound to the two accounts.
        let role = find(&objs, "ClusterRole", "gpuscale-scaler");
        let text = role["rules"].to_string();
        assert!(!text.contains("\"*\""), "no wildcards: {text}");
        assert!(text.contains("deployments/scale") && text.contains("inferenceautoscalers/status"));
        for (group, resource) in [
            ("authentication.k8s.io", "tokenreviews"),
            ("authorization.k8s.io", "subjectaccessreviews"),
        ] {
            let rule = role["rules"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| strings(&r["resources"]) == [resource])
                .unwrap_or_else(|| panic!("no rule for {resource}"));
            assert_eq!(strings(&rule["apiGroups"]), [group]);
            assert_eq!(strings(&rule["verbs"]), ["create"]);
        }

        // NetworkPolicies: the gRPC port from agents, KEDA and labelled
        // namespaces; the metrics ports from the monitoring namespace.
        let np = find(&objs, "NetworkPolicy", "gpuscale-scaler");
        assert_eq!(
            np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "gpuscale-scaler"
        );
        assert_eq!(strings(&np["spec"]["policyTypes"]), ["Ingress"]);
        let grpc = &np["spec"]["ingress"][0];
        assert_eq!(grpc["ports"][0]["port"], "grpc");
        let from = grpc["from"].to_string();
        for peer in ["gpuscale-agent", "keda", "gpuscale.dev/api-access"] {
            assert!(from.contains(peer), "{overlay}: {from}");
        }
        let metrics_rule = &np["spec"]["ingress"][1];
        assert_eq!(metrics_rule["ports"][0]["port"], "metrics");
        assert!(metrics_rule["from"].to_string().contains("monitoring"));
        let anp = find(&objs, "NetworkPolicy", "gpuscale-agent");
        assert_eq!(anp["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
        assert_eq!(anp["spec"]["ingress"].as_array().unwrap().len(), 1);
        if overlay == "production" {
            let cert = find(&objs, "Certificate", "gpuscale-scaler");
            assert_eq!(cert["spec"]["secretName"], "gpuscale-scaler-tls");
            assert!(
                strings(&cert["spec"]["dnsNames"])
                    .contains(&"gpuscale-scaler.gpuscale-system.svc".to_string())
            );
        }
        let agent_role = find(&objs, "ClusterRole", "gpuscale-agent");
        assert!(agent_role["rules"].to_string().contains("pods/status"));
        let leases = find(&objs, "Role", "gpuscale-scaler-leader-election");
        assert_eq!(strings(&leases["rules"][0]["resources"]), ["leases"]);
        for (binding, account) in [
            ("gpuscale-scaler", "gpuscale-scaler"),
            ("gpuscale-agent", "gpuscale-agent"),
        ] {
            let b = find(&objs, "ClusterRoleBinding", binding);
            assert_eq!(b["subjects"][0]["name"], account);
            assert_eq!(b["subjects"][0]["namespace"], "gpuscale-system");
        }

        // Services and monitoring.
        let svc = find(&objs, "Service", "gpuscale-scaler");
        let ports: Vec<i64> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, [7070, 9090]);
        let metrics = find(&objs, "Service", "gpuscale-scaler-metrics");
        assert_eq!(metrics["spec"]["publishNotReadyAddresses"], true);
        find(&objs, "Service", "gpuscale-agent-metrics");
        let sm = find(&objs, "ServiceMonitor", "gpuscale-scaler");
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            "metrics"
        );
        assert_eq!(
            metrics["metadata"]["labels"]["app.kubernetes.io/component"],
            "metrics"
        );
        let pm = find(&objs, "PodMonitor", "gpuscale-agent");
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
        let rules = find(&objs, "PrometheusRule", "gpuscale");
        assert!(
            rules["spec"]["groups"][0]["rules"][0]["expr"]
                .as_str()
                .unwrap()
                .contains("gpuscale_scaler_active")
        );
    }
}

fn assert_secure(container: &Value, overlay: &str) {
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay}");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{overlay}");
}

#[test]
fn the_example_autoscaler_is_valid_and_its_deployment_declares_the_readiness_gate() {
    let text = std::fs::read_to_string(root().join("deploy/examples/vllm-llama3-8b.yaml")).unwrap();
    let objs = docs(&text);
    let deploy = find(&objs, "Deployment", "llama-8b");
    let template = &deploy["spec"]["template"];
    assert_eq!(
        template["spec"]["readinessGates"][0]["conditionType"],
        "gpuscale.dev/engine-warm"
    );
    assert_eq!(
        template["metadata"]["annotations"]["gpuscale.dev/metrics-port"],
        "8000"
    );
    let ias_value = find(&objs, "InferenceAutoscaler", "llama-8b").clone();
    let ias: gpuscale_kube::InferenceAutoscaler = serde_json::from_value(ias_value).unwrap();
    assert_eq!(ias.spec.workload.target.name, "llama-8b");
    gpuscale_kube::controller::validate(&ias.spec).expect("the example is valid");
}

#[test]
fn the_scale_to_zero_example_is_valid_and_its_activator_routes_to_the_warm_pods() {
    let text = std::fs::read_to_string(root().join("deploy/examples/scale-to-zero.yaml")).unwrap();
    let objs = docs(&text);
    let ias: gpuscale_kube::InferenceAutoscaler =
        serde_json::from_value(find(&objs, "InferenceAutoscaler", "chat").clone()).unwrap();
    assert_eq!(ias.spec.workload.min_replicas, 0);
    gpuscale_kube::controller::validate(&ias.spec).expect("the example is valid");
    let config = ias.spec.workload.validate().unwrap();
    assert_eq!(config.scale_to_zero.cold_start_penalty_s, 240.0);
    // The clients' Service selects the activator; the activator forwards to
    // the Service of the model's pods, which declare the readiness gate.
    let activator = find(&objs, "Deployment", "gpuscale-activator");
    let tmpl = &activator["spec"]["template"];
    let front = find(&objs, "Service", "chat");
    assert_eq!(
        front["spec"]["externalName"],
        "gpuscale-activator.gpuscale-system.svc.cluster.local"
    );
    let svc = find(&objs, "Service", "gpuscale-activator");
    assert_eq!(svc["spec"]["selector"], tmpl["metadata"]["labels"]);
    let args = strings(&tmpl["spec"]["containers"][0]["args"]);
    assert_eq!(args[0], "activator");
    assert!(args.contains(&"--workload=llm/chat=http://chat-ready.llm:80".to_string()));
    let ready = find(&objs, "Service", "chat-ready");
    let model = find(&objs, "Deployment", "chat");
    assert_eq!(
        ready["spec"]["selector"],
        model["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        model["spec"]["template"]["spec"]["readinessGates"][0]["conditionType"],
        "gpuscale.dev/engine-warm"
    );
    assert_secure(&tmpl["spec"]["containers"][0], "scale-to-zero");
    // The binary accepts the activator's flags as written.
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            if a.starts_with("--listen=") {
                "--listen=256.0.0.1:1".to_string()
            } else {
                a
            }
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid --listen `256.0.0.1:1`"),
        "only the bad --listen is refused: {err}"
    );
}

/// CRDs the fake API server serves for the kinds of other operators the
/// manifests use (schemas left open: only the kinds are checked here).
fn foreign_crd(group: &str, kind: &str, plural: &str, namespaced: bool) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "scope": if namespaced { "Namespaced" } else { "Cluster" },
            "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_client_dry_run_applies_every_overlay() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let server = gpuscale_fake_apiserver::FakeApiServer::start(
        gpuscale_fake_apiserver::FakeApiServerConfig::default(),
    )
    .await
    .unwrap();
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(server.client().unwrap());
    for (group, kind, plural) in [
        ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
        ("monitoring.coreos.com", "PodMonitor", "podmonitors"),
        ("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
        ("cert-manager.io", "Certificate", "certificates"),
        ("cert-manager.io", "Issuer", "issuers"),
    ] {
        let crd: CustomResourceDefinition =
            serde_json::from_value(foreign_crd(group, kind, plural, true)).unwrap();
        crds.create(&kube::api::PostParams::default(), &crd)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             current-context: fake\n",
            server.url()
        ),
    )
    .unwrap();
    for overlay in ["dev", "production"] {
        let dir = root().join("deploy/overlays").join(overlay);
        let out = tokio::task::spawn_blocking({
            let kubeconfig = kubeconfig.clone();
            move || {
                Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args([
                        "apply",
                        "--dry-run=client",
                        "--validate=false",
                        "-o",
                        "name",
                        "-k",
                    ])
                    .arg(&dir)
                    .output()
                    .expect("kubectl runs (these tests need kubectl 1.32 on PATH)")
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl apply --dry-run=client -k deploy/overlays/{overlay}:\n{}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        for object in [
            "networkpolicy.networking.k8s.io/gpuscale-scaler",
            "clusterrole.rbac.authorization.k8s.io/gpuscale-scaler",
            "daemonset.apps/gpuscale-agent",
            "deployment.apps/gpuscale-scaler",
        ] {
            assert!(stdout.contains(object), "{overlay}: {stdout}");
        }
        if overlay == "production" {
            assert!(
                stdout.contains("certificate.cert-manager.io/gpuscale-scaler"),
                "{stdout}"
            );
        }
    }
    // A dry run creates nothing.
    assert!(server.objects("apps", "daemonsets", None).is_empty());
}

#[tokio::test]
async fn the_self_signed_certificates_of_deploy_scripts_serve_tls() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(root().join("deploy/scripts/self-signed-certs.sh"))
        .arg(dir.path())
        .env("CLIENTS", "keda-operator.keda.svc")
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "self-signed-certs.sh (needs openssl on PATH): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tls = gpuscale_scaler::edge::TlsConfig::new(
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
    );
    tls.client_ca = Some(dir.path().join("ca.crt"));
    let mut config = gpuscale_scaler::ScalerConfig::new("127.0.0.1:0".parse().unwrap());
    config.transport = gpuscale_scaler::edge::Transport::Tls(tls);
    config.auth =
        gpuscale_scaler::edge::AuthConfig::with_mode(gpuscale_scaler::edge::AuthMode::Certificates);
    let scaler = gpuscale_scaler::Scaler::new(config).start().await.unwrap();
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://{}", scaler.grpc_addr()))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")))
                    .domain_name("gpuscale-scaler.gpuscale-system.svc")
                    .identity(tonic::transport::Identity::from_pem(
                        read("keda-operator.keda.svc.crt"),
                        read("keda-operator.keda.svc.key"),
                    )),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
    let listed = gpuscale_proto::v1::scaler_service_client::ScalerServiceClient::new(channel)
        .list_workloads(gpuscale_proto::v1::ListWorkloadsRequest::default())
        .await
        .expect("served over TLS to a client with the script's client certificate");
    assert!(listed.into_inner().workloads.is_empty());
    scaler.shutdown().await.unwrap();
}

/// The port of a `--flag=HOST:PORT` or `--flag=http://HOST:PORT` argument.
fn flag_port(args: &[String], flag: &str) -> u64 {
    let value = args
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    value
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{flag}={value} has no port"))
}

fn named_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name} on {}", container["name"]))
}

#[test]
fn the_example_engine_runs_behind_the_proxy_as_a_native_sidecar() {
    let text = std::fs::read_to_string(root().join("deploy/examples/vllm-llama3-8b.yaml")).unwrap();
    let objs = docs(&text);
    let pod = &find(&objs, "Deployment", "llama-8b")["spec"]["template"]["spec"];
    let proxy = pod["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "gpuscale-proxy"))
        .expect("the proxy is an init container");
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    let args = strings(&proxy["args"]);
    assert_eq!(args[0], "proxy");
    assert_flags_exist("proxy", &args[1..]);
    let mut help: Vec<&str> = args.iter().map(String::as_str).collect();
    help.push("--help");
    gpuscale(&help);

    // Clients reach the proxy, the proxy the engine.
    let engine = &pod["containers"][0];
    assert_eq!(engine["name"], "vllm");
    let service = find(&objs, "Service", "llama-8b");
    let target = service["spec"]["ports"][0]["targetPort"].as_str().unwrap();
    assert_eq!(named_port(proxy, target), flag_port(&args, "--listen"));
    assert!(
        engine["ports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != target),
        "the Service must not reach the engine past the proxy"
    );
    assert_eq!(
        flag_port(&args, "--upstream"),
        named_port(engine, "engine"),
        "the proxy forwards to the engine's port"
    );

    // Drain: readiness from the proxy, the engine stopped only after /drain.
    let admin = named_port(proxy, "proxy-admin");
    assert_eq!(admin, flag_port(&args, "--admin-addr"));
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/readyz");
    let pre_stop = &engine["lifecycle"]["preStop"]["httpGet"];
    assert_eq!(pre_stop["path"], "/drain");
    assert_eq!(pre_stop["port"].as_u64(), Some(admin));
    let drain = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-timeout="))
        .and_then(|d| gpuscale_core::time::parse_duration(d).ok())
        .expect("--drain-timeout");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        drain.as_secs() < grace,
        "the preStop drain fits the grace period"
    );

    // The agent's socket: the path the agent DaemonSet serves.
    let socket = args
        .iter()
        .find_map(|a| a.strip_prefix("--agent=unix:"))
        .expect("--agent=unix:PATH");
    let agent = kustomize::overlay("dev");
    let agent = find(&agent, "DaemonSet", "gpuscale-agent");
    let agent_args = strings(&agent["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(
        agent_args.contains(&format!("--serving-addr=unix:{socket}")),
        "{agent_args:?}"
    );
    let dir = std::path::Path::new(socket).parent().unwrap();
    let mount = proxy["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == dir.to_str().unwrap()))
        .expect("the socket's directory is mounted");
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .expect("its volume");
    assert_eq!(volume["hostPath"]["path"], dir.to_str().unwrap());
    let names: Vec<&str> = env_names(proxy);
    assert!(names.contains(&"POD_NAME") && names.contains(&"POD_NAMESPACE"));
}

fn env_names(container: &Value) -> Vec<&str> {
    container["env"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["name"].as_str()).collect())
        .unwrap_or_default()
}
