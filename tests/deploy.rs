//! The manifests in `deploy/`: every kustomize overlay renders with the
//! `kubectl` CI has (1.32, with kustomize), and the rendered objects are
//! what a cluster needs: kinds, images, least-privilege RBAC, probes,
//! security contexts, flags the binary accepts. The CRD in `deploy/` is
//! what `gpuscale crd` prints, and the example autoscaler is valid and its
//! Deployment declares the readiness gate.

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
        ["Target", "Min", "Max", "Desired", "Ready", "SLO", "Age"]
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
        assert_eq!(
            kinds,
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "CustomResourceDefinition",
                "DaemonSet",
                "Deployment",
                "Namespace",
                "PodMonitor",
                "PrometheusRule",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
                "ServiceMonitor"
            ],
            "{overlay}"
        );
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
        assert!(
            args.iter()
                .any(|a| a.starts_with("--scaler=http://gpuscale-scaler.gpuscale-system.svc:7070"))
        );
        assert_flags_exist("agent", &args);
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
