//! Device IDs as the kubelet reports them, mapped to NVML UUIDs.
//!
//! Device plugins name GPUs differently (REFERENCE §5.1, §5.2):
//!
//! | form | plugin / mode | maps to |
//! |---|---|---|
//! | `GPU-<uuid>` | NVIDIA plugin | that GPU |
//! | `MIG-<uuid>` | NVIDIA plugin, MIG | that MIG device |
//! | `GPU-<uuid>::<n>`, `MIG-<uuid>::<n>` | time-slicing / MPS replicas | the GPU (MIG device) without the suffix |
//! | `MIG-GPU-<uuid>/<gi>/<ci>` | old drivers' MIG names | the MIG device of that GPU with GPU instance `gi` |
//! | `nvidia<N>`, `nvidia<N>/vgpu<k>` | GKE plugin, GKE sharing | the GPU with NVML index `N` |
//! | `nvidia<N>/gi<g>[/vgpu<k>]` | GKE plugin, MIG | the MIG device of GPU `N` with GPU instance `g` |
//!
//! A MIG form whose GPU instance is not known to the inventory (NVML only
//! reveals it once something runs on the instance, see [`crate::nvml`]) maps
//! to the parent GPU: the pod is on that GPU, just not resolved to the
//! instance. Pure code.

use gpuscale_core::ids::GpuUuid;
use gpuscale_core::sample::GpuInfo;

/// A parsed `device_ids` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeviceId {
    /// `GPU-…` or `MIG-…`, sharing suffix removed.
    Uuid(GpuUuid),
    /// `MIG-GPU-<uuid>/<gi>/<ci>`.
    LegacyMig { parent: GpuUuid, gpu_instance: u32 },
    /// GKE `nvidia<N>` (and `nvidia<N>/vgpu<k>`).
    Index { index: u32 },
    /// GKE `nvidia<N>/gi<g>`.
    IndexMig { index: u32, gpu_instance: u32 },
    /// Anything else (e.g. another vendor's plugin).
    Unknown(String),
}

/// Parses one kubelet device ID.
pub(crate) fn parse_device_id(raw: &str) -> DeviceId {
    let id = raw.trim();
    if let Some(rest) = id.strip_prefix("MIG-GPU-") {
        // MIG-GPU-<uuid>/<gi>/<ci>
        let mut parts = rest.split('/');
        if let (Some(uuid), Some(gi), Some(_ci), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
            && let Ok(gpu_instance) = gi.parse()
            && !uuid.is_empty()
        {
            return DeviceId::LegacyMig {
                parent: GpuUuid::new(format!("GPU-{uuid}")),
                gpu_instance,
            };
        }
        return DeviceId::Unknown(raw.to_string());
    }
    if id.starts_with("GPU-") || id.starts_with("MIG-") {
        let base = match id.split_once("::") {
            Some((base, replica)) if replica.chars().all(|c| c.is_ascii_digit()) => base,
            Some(_) => return DeviceId::Unknown(raw.to_string()),
            None => id,
        };
        if base.len() > 4 && !base.contains(['/', ' ']) {
            return DeviceId::Uuid(GpuUuid::new(base));
        }
        return DeviceId::Unknown(raw.to_string());
    }
    if let Some(rest) = id.strip_prefix("nvidia") {
        let mut parts = rest.split('/');
        let Some(Ok(index)) = parts.next().map(str::parse::<u32>) else {
            return DeviceId::Unknown(raw.to_string());
        };
        let mut gpu_instance = None;
        for part in parts {
            if let Some(g) = part.strip_prefix("gi")
                && let Ok(g) = g.parse()
                && gpu_instance.is_none()
            {
                gpu_instance = Some(g);
            } else if part
                .strip_prefix("vgpu")
                .is_some_and(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()))
            {
                // A sharing replica: the same device.
            } else {
                return DeviceId::Unknown(raw.to_string());
            }
        }
        return match gpu_instance {
            Some(gpu_instance) => DeviceId::IndexMig {
                index,
                gpu_instance,
            },
            None => DeviceId::Index { index },
        };
    }
    DeviceId::Unknown(raw.to_string())
}

/// Maps a parsed ID to an NVML UUID with the node's inventory. `None` when
/// the ID cannot be mapped (an index the inventory does not have, an unknown
/// form).
pub(crate) fn resolve_device_id(id: &DeviceId, inventory: &[GpuInfo]) -> Option<GpuUuid> {
    let full_gpu_at = |index: u32| {
        inventory
            .iter()
            .find(|g| g.parent_uuid.is_none() && g.index == index)
    };
    // A UUID is taken as it is only while the node's GPUs are unknown (no
    // NVML); otherwise one that is not on this node is not attributed.
    let on_node = |u: &GpuUuid| inventory.is_empty() || inventory.iter().any(|g| &g.uuid == u);
    match id {
        DeviceId::Uuid(u) => on_node(u).then(|| u.clone()),
        DeviceId::LegacyMig {
            parent,
            gpu_instance,
        } => inventory
            .iter()
            .find(|g| {
                g.parent_uuid.as_ref() == Some(parent)
                    && g.mig_gpu_instance_id == Some(*gpu_instance)
            })
            .map(|g| g.uuid.clone())
            .or_else(|| on_node(parent).then(|| parent.clone())),
        DeviceId::Index { index } => full_gpu_at(*index).map(|g| g.uuid.clone()),
        DeviceId::IndexMig {
            index,
            gpu_instance,
        } => {
            let parent = full_gpu_at(*index)?;
            inventory
                .iter()
                .find(|g| {
                    g.parent_uuid.as_ref() == Some(&parent.uuid)
                        && g.mig_gpu_instance_id == Some(*gpu_instance)
                })
                .or(Some(parent))
                .map(|g| g.uuid.clone())
        }
        DeviceId::Unknown(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, index: u32) -> GpuInfo {
        GpuInfo {
            uuid: GpuUuid::new(uuid),
            index,
            model_name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            pci_bus_id: String::new(),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: true,
            driver_version: "580.82.07".into(),
        }
    }

    fn mig(uuid: &str, parent: &str, index: u32, gi: Option<u32>) -> GpuInfo {
        GpuInfo {
            parent_uuid: Some(GpuUuid::new(parent)),
            mig_gpu_instance_id: gi,
            ..gpu(uuid, index)
        }
    }

    fn inventory() -> Vec<GpuInfo> {
        vec![
            gpu("GPU-aaaa", 0),
            gpu("GPU-bbbb", 1),
            mig("MIG-b3", "GPU-bbbb", 1, Some(3)),
            mig("MIG-b5", "GPU-bbbb", 1, None),
        ]
    }

    fn map(raw: &str) -> Option<String> {
        resolve_device_id(&parse_device_id(raw), &inventory()).map(|u| u.0)
    }

    #[test]
    fn nvidia_plugin_uuids_map_to_themselves() {
        assert_eq!(map("GPU-aaaa").as_deref(), Some("GPU-aaaa"));
        assert_eq!(map("MIG-b3").as_deref(), Some("MIG-b3"));
    }

    #[test]
    fn sharing_replica_suffixes_are_removed() {
        assert_eq!(map("GPU-aaaa::0").as_deref(), Some("GPU-aaaa"));
        assert_eq!(map("GPU-aaaa::12").as_deref(), Some("GPU-aaaa"));
        assert_eq!(map("MIG-b3::1").as_deref(), Some("MIG-b3"));
    }

    #[test]
    fn gke_names_map_through_the_index() {
        assert_eq!(map("nvidia0").as_deref(), Some("GPU-aaaa"));
        assert_eq!(map("nvidia1/vgpu3").as_deref(), Some("GPU-bbbb"));
        assert_eq!(map("nvidia1/gi3").as_deref(), Some("MIG-b3"));
        assert_eq!(map("nvidia1/gi3/vgpu0").as_deref(), Some("MIG-b3"));
    }

    #[test]
    fn a_mig_instance_unknown_to_the_inventory_maps_to_its_parent() {
        assert_eq!(map("nvidia1/gi5").as_deref(), Some("GPU-bbbb"));
        assert_eq!(map("MIG-GPU-bbbb/5/0").as_deref(), Some("GPU-bbbb"));
    }

    #[test]
    fn legacy_mig_names_map_to_the_instance() {
        assert_eq!(
            parse_device_id("MIG-GPU-bbbb/3/0"),
            DeviceId::LegacyMig {
                parent: GpuUuid::new("GPU-bbbb"),
                gpu_instance: 3
            }
        );
        assert_eq!(map("MIG-GPU-bbbb/3/0").as_deref(), Some("MIG-b3"));
    }

    #[test]
    fn unknown_forms_and_absent_indices_do_not_map() {
        assert_eq!(map("nvidia7"), None);
        assert_eq!(map("amd.com/gpu-0"), None);
        assert_eq!(map("nvidia0/bogus"), None);
        assert_eq!(map("GPU-aaaa::x"), None);
        assert_eq!(map(""), None);
    }
}
