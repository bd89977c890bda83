{{- /*
Names, labels and the image reference every workload template shares.

meshgress is one installation per cluster: its ServiceAccounts, cluster roles and admission
policies have fixed names (the policies match the ServiceAccounts by name), so every
object is named `meshgress-...` whatever the release is called.
*/}}

{{/* The labels on every object of the release; `component` says which part it is. */}}
{{- define "meshgress.labels" -}}
app.kubernetes.io/name: meshgress
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* What a workload's selector matches: stable across upgrades (selectors are immutable). */}}
{{- define "meshgress.selectorLabels" -}}
app.kubernetes.io/name: meshgress
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given (it wins over the tag). */}}
{{- define "meshgress.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{ $image.repository }}@{{ $image.digest }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/*
The node agent keeps slot Leases readable and the gateways write them in one namespace
(meshgress.datastore.LEASE_NAMESPACE); its ServiceAccounts' roles are bound there. The
release must live in it.
*/}}
{{- define "meshgress.namespace" -}}
{{- $leaseNamespace := "meshgress-system" -}}
{{- if ne .Release.Namespace $leaseNamespace -}}
{{- fail (printf "meshgress must be installed in the namespace %s (where its gateways keep their slot Leases), not %s: helm install --namespace %s --create-namespace ..." $leaseNamespace .Release.Namespace $leaseNamespace) -}}
{{- end -}}
{{ $leaseNamespace }}
{{- end }}

{{/* The metrics/health listen addresses: loopback for the kubelet's probes, the node's
InternalIP for Prometheus; never every address (the pod runs in the host's network). */}}
{{- define "meshgress.metricsAddress" -}}
127.0.0.1:{{ .port }}{{ if .nodeIP }},node-ip:{{ .port }}{{ end }}
{{- end }}
