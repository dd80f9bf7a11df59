{{/* The components, in one place: every template ranges over this list. */}}
{{- define "tailor.components" -}}
gateway quantizer trainer benchmarker exporter selector
{{- end -}}

{{/* The stage services the gateway dispatches to (its static worker pools). */}}
{{- define "tailor.workerPools" -}}
quantizer trainer benchmarker exporter selector
{{- end -}}

{{- define "tailor.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: tailor.componentName (dict "root" $ "name" "quantizer") */}}
{{- define "tailor.componentName" -}}
{{- printf "%s-%s" (include "tailor.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tailor.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "tailor.labels" -}}
{{ include "tailor.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "tailor.image" -}}
{{- $c := index .root.Values .name -}}
{{- printf "%s%s:%s" .root.Values.global.imageRegistry $c.image.repository ($c.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* The gateway's ServiceAccount (it lists EndpointSlices when discovery.mode is kubernetes). */}}
{{- define "tailor.gatewayServiceAccount" -}}
{{- include "tailor.componentName" (dict "root" . "name" "gateway") -}}
{{- end -}}

{{/* Label selector of this release's Services; their EndpointSlices carry the same labels. */}}
{{- define "tailor.discoverySelector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" .Chart.Name .Release.Name -}}
{{- end -}}

{{/* Resources of one component, with the GPU added to requests and limits when gpu.count > 0. */}}
{{- define "tailor.resources" -}}
{{- $c := index .root.Values .name -}}
{{- $resources := deepCopy ($c.resources | default dict) -}}
{{- if gt (int $c.gpu.count) 0 -}}
{{- $gpu := .root.Values.gpuNodes.resourceName -}}
{{- $_ := set $resources "requests" (merge (dict $gpu (int $c.gpu.count)) ($resources.requests | default dict)) -}}
{{- $_ := set $resources "limits" (merge (dict $gpu (int $c.gpu.count)) ($resources.limits | default dict)) -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Tolerations of one component: its own, plus the GPU nodes' when it asks for GPUs. */}}
{{- define "tailor.tolerations" -}}
{{- $c := index .root.Values .name -}}
{{- $tolerations := $c.tolerations | default list -}}
{{- if gt (int $c.gpu.count) 0 -}}
{{- range .root.Values.gpuNodes.tolerations -}}
{{- if not (has . $tolerations) -}}
{{- $tolerations = append $tolerations . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $tolerations -}}
{{- toYaml $tolerations -}}
{{- end -}}
{{- end -}}
