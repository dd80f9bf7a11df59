{{/*
Combinations values.schema.json cannot express; each failure says what to change.
Included from deployments.yaml so that every render runs them.
*/}}
{{- define "tailor.checks" -}}
{{- $gw := .Values.gateway -}}
{{- if not $gw.enabled -}}
{{- fail "gateway.enabled=false: the gateway is the only entry point and cannot be left out" -}}
{{- end -}}
{{- if or (gt (int $gw.replicaCount) 1) $gw.autoscaling.enabled -}}
{{- fail "gateway: the durable state is one SQLite file with one writer; set gateway.replicaCount=1 and gateway.autoscaling.enabled=false" -}}
{{- end -}}
{{- range $name := splitList " " (include "tailor.components" .) -}}
{{- $a := (index $.Values $name).autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling: minReplicas (%v) is greater than maxReplicas (%v)" $name $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- if not (hasPrefix "s3://" .Values.store.url) -}}
{{- fail (printf "store.url=%s: in a cluster every pod must reach the same store; use s3://bucket/prefix" .Values.store.url) -}}
{{- end -}}
{{- end -}}
