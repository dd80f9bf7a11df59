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
{{- if $gw.pools -}}
{{- fail "gateway.pools: the gateway is one pod; pools are for the stage services and Triton" -}}
{{- end -}}
{{- range $name := splitList " " (include "tailor.workloads" .) -}}
{{- $c := index $.Values $name -}}
{{- $a := $c.autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling: minReplicas (%v) is greater than maxReplicas (%v)" $name $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- $seen := list -}}
{{- range $p := $c.pools -}}
{{- if has $p.name $seen -}}
{{- fail (printf "%s.pools: the pool name %q is used twice" $name $p.name) -}}
{{- end -}}
{{- $seen = append $seen $p.name -}}
{{- with $p.autoscaling -}}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) -}}
{{- fail (printf "%s.pools[%s].autoscaling: minReplicas (%v) is greater than maxReplicas (%v)" $name $p.name .minReplicas .maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $p := prepend (.Values.web.pools | default list) .Values.web -}}
{{- if gt (int (($p.gpu | default dict).count | default 0)) 0 -}}
{{- fail "web: the web front needs no GPU; set web.gpu.count=0 (and in every web pool)" -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.store.minio.enabled) (not .Values.store.external.existingSecret) -}}
{{- fail "store.minio.enabled=false: set store.external.existingSecret to a Secret with keys access-key and secret-key (and store.external.endpoint unless the store is AWS S3)" -}}
{{- end -}}
{{- if and .Values.gatewayState.postgresql.enabled .Values.gatewayState.external.urlSecret -}}
{{- fail "gatewayState: postgresql.enabled=true and external.urlSecret are both set; choose the bundled PostgreSQL or the external database" -}}
{{- end -}}
{{- if not (hasPrefix "s3://" .Values.store.url) -}}
{{- fail (printf "store.url=%s: in a cluster every pod must reach the same store; use s3://bucket/prefix" .Values.store.url) -}}
{{- end -}}
{{- end -}}
