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
