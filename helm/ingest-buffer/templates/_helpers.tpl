{{/*
Named templates. The ones meant for other charts (sidecar mode):
  "ingest-buffer.sidecar"   the buffer as a native sidecar: put it under initContainers
  "ingest-buffer.container" the buffer as a plain container (clusters older than 1.29)
  "ingest-buffer.volumes"   the volumes both need
  "ingest-buffer.terminationGracePeriodSeconds"
From a parent chart that depends on this one, pass this chart's context:
  {{ include "ingest-buffer.sidecar" (index .Subcharts "ingest-buffer") | nindent 8 }}
*/}}

{{- define "ingest-buffer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ingest-buffer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "ingest-buffer.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "ingest-buffer.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "ingest-buffer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ingest-buffer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ingest-buffer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ingest-buffer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ingest-buffer.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "ingest-buffer.passwordSecret" -}}
{{- if .Values.clickhouse.existingSecret }}{{ .Values.clickhouse.existingSecret }}
{{- else if .Values.clickhouse.password }}{{ include "ingest-buffer.fullname" . }}-clickhouse
{{- end }}
{{- end }}

{{/*
The grace period must cover the drain deadline plus the exit; derived unless set, refused if short.
*/}}
{{- define "ingest-buffer.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.shutdown.drainTimeoutSeconds }}
{{- if and (eq .Values.mode "gateway") (le $drain (int .Values.shutdown.propagationDelaySeconds)) }}
{{- fail (printf "shutdown.drainTimeoutSeconds (%d) must be larger than shutdown.propagationDelaySeconds (%d): the drain deadline starts at preStop and must leave time to flush after the delay" $drain (int .Values.shutdown.propagationDelaySeconds)) }}
{{- end }}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add $drain 5 }}
{{- else }}
{{- $grace := int .Values.shutdown.terminationGracePeriodSeconds }}
{{- if lt $grace (add $drain 2) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) is shorter than shutdown.drainTimeoutSeconds + 2 (%d): the kubelet would SIGKILL the buffer before it reports what it could not flush; raise it or lower drainTimeoutSeconds" $grace (add $drain 2)) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/*
A size as the buffer reads it (binary units, any case: 64MiB, 512k, 1048576) in bytes.
*/}}
{{- define "ingest-buffer.bytes" -}}
{{- $s := lower (trim (toString .)) }}
{{- $n := regexFind "^[0-9]+(\\.[0-9]+)?" $s }}
{{- $units := dict "" 1 "b" 1 "k" 1024 "kb" 1024 "ki" 1024 "kib" 1024 "m" 1048576 "mb" 1048576 "mi" 1048576 "mib" 1048576 "g" 1073741824 "gb" 1073741824 "gi" 1073741824 "gib" 1073741824 }}
{{- mulf (float64 $n) (get $units (trim (trimPrefix $n $s))) | int64 }}
{{- end }}

{{/*
A Kubernetes quantity (512Mi, 2Gi, 500M, 1073741824) in bytes.
*/}}
{{- define "ingest-buffer.quantity" -}}
{{- $s := ternary (printf "%.0f" .) (trim (toString .)) (kindIs "float64" .) }}
{{- $n := regexFind "^[0-9]+(\\.[0-9]+)?([eE][+-]?[0-9]+)?" $s }}
{{- $unit := trimPrefix $n $s }}
{{- $units := dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 }}
{{- if or (not $n) (not (hasKey $units $unit)) }}
{{- fail (printf "%v is not a Kubernetes quantity (write it as 512Mi, 2Gi, 500M or a number of bytes)" .) }}
{{- end }}
{{- mulf (float64 $n) (get $units $unit) | int64 }}
{{- end }}

{{/*
What the buffer would refuse at start (a crash loop), or the kubelet would do to it (an OOM kill, an
eviction), refused here with the value to change.
*/}}
{{- define "ingest-buffer.validate" -}}
{{- range $name, $size := dict "buffer.maxBytes" .Values.buffer.maxBytes "buffer.maxRequestBytes" .Values.buffer.maxRequestBytes "flush.maxBytes" .Values.flush.maxBytes "deadLetters.maxBytes" .Values.deadLetters.maxBytes "wal.maxBytes" .Values.wal.maxBytes }}
{{- if le (include "ingest-buffer.bytes" $size | int64) 0 }}
{{- fail (printf "%s (%v) must be more than 0 bytes: the buffer would refuse to start (a crash loop)" $name $size) }}
{{- end }}
{{- end }}
{{- $max := include "ingest-buffer.bytes" .Values.buffer.maxBytes | int64 }}
{{- $request := include "ingest-buffer.bytes" .Values.buffer.maxRequestBytes | int64 }}
{{- $flush := include "ingest-buffer.bytes" .Values.flush.maxBytes | int64 }}
{{- if gt $request $max }}
{{- fail (printf "buffer.maxRequestBytes (%v) is larger than buffer.maxBytes (%v): the buffer would refuse to start (a crash loop); raise buffer.maxBytes or lower buffer.maxRequestBytes" .Values.buffer.maxRequestBytes .Values.buffer.maxBytes) }}
{{- end }}
{{- if gt $flush $max }}
{{- fail (printf "flush.maxBytes (%v) is larger than buffer.maxBytes (%v): the buffer would refuse to start (a crash loop); raise buffer.maxBytes or lower flush.maxBytes" .Values.flush.maxBytes .Values.buffer.maxBytes) }}
{{- end }}
{{- with (.Values.resources.limits | default dict).memory }}
{{- $limit := include "ingest-buffer.quantity" . | int64 }}
{{- $headroom := 134217728 }}
{{- if gt (add $max $headroom) $limit }}
{{- fail (printf "buffer.maxBytes (%v) plus the process's own 128Mi does not fit resources.limits.memory (%v): the kubelet would OOM-kill the buffer with rows in it; raise the limit to at least %dMi or lower buffer.maxBytes" $.Values.buffer.maxBytes . (div (add $max $headroom 1048575) 1048576)) }}
{{- end }}
{{- end }}
{{- if not .Values.deadLetters.existingClaim }}
{{- if gt (include "ingest-buffer.bytes" .Values.deadLetters.maxBytes | int64) (include "ingest-buffer.quantity" .Values.deadLetters.sizeLimit | int64) }}
{{- fail (printf "deadLetters.maxBytes (%v) is larger than their volume (deadLetters.sizeLimit %v): the kubelet would evict the pod as dead letters piled up; lower deadLetters.maxBytes or raise deadLetters.sizeLimit" .Values.deadLetters.maxBytes .Values.deadLetters.sizeLimit) }}
{{- end }}
{{- end }}
{{- if .Values.wal.enabled }}
{{- $wal := include "ingest-buffer.bytes" .Values.wal.maxBytes | int64 }}
{{- $claim := include "ingest-buffer.walClaim" . }}
{{- $disk := ternary .Values.wal.persistence.size .Values.wal.sizeLimit (eq $claim "true") }}
{{- if gt $wal (include "ingest-buffer.quantity" $disk | int64) }}
{{- fail (printf "wal.maxBytes (%v) is larger than the log's volume (%s %v): the kubelet would evict the pod when the log grows past it; lower wal.maxBytes or raise %s" .Values.wal.maxBytes (ternary "wal.persistence.size" "wal.sizeLimit" (eq $claim "true")) $disk (ternary "wal.persistence.size" "wal.sizeLimit" (eq $claim "true"))) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when the buffer runs as a native sidecar: sidecar.native, on a cluster that has them (1.29+).
On an older one the example falls back to a plain container, which relies on its linger.
*/}}
{{- define "ingest-buffer.native" -}}
{{- if and .Values.sidecar.native (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- end }}

{{- define "ingest-buffer.env" -}}
{{- $_ := include "ingest-buffer.validate" . -}}
- name: INGEST_BUFFER_MODE
  value: {{ .Values.mode | quote }}
- name: INGEST_BUFFER_GRPC_LISTEN
  value: {{ if .Values.grpc.unixSocket }}{{ printf "unix:%s" .Values.grpc.unixSocket | quote }}{{ else if eq .Values.mode "gateway" }}{{ printf "0.0.0.0:%d" (int .Values.grpc.port) | quote }}{{ else }}{{ printf "127.0.0.1:%d" (int .Values.grpc.port) | quote }}{{ end }}
- name: INGEST_BUFFER_HTTP_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.http.port) | quote }}
- name: INGEST_BUFFER_CLICKHOUSE_URL
  value: {{ .Values.clickhouse.url | quote }}
- name: INGEST_BUFFER_DATABASE
  value: {{ .Values.clickhouse.database | quote }}
- name: INGEST_BUFFER_CLICKHOUSE_USER
  value: {{ .Values.clickhouse.user | quote }}
{{- if include "ingest-buffer.passwordSecret" . }}
- name: INGEST_BUFFER_CLICKHOUSE_PASSWORD_FILE
  value: /etc/ingest-buffer/clickhouse/password
{{- end }}
{{- if .Values.clickhouse.caSecret }}
- name: INGEST_BUFFER_CLICKHOUSE_CA_FILE
  value: /etc/ingest-buffer/ca/ca.crt
{{- end }}
- name: INGEST_BUFFER_CLICKHOUSE_COMPRESSION
  value: {{ .Values.clickhouse.compression | quote }}
- name: INGEST_BUFFER_INSERT_TIMEOUT
  value: {{ printf "%ds" (int .Values.clickhouse.insertTimeoutSeconds) | quote }}
- name: INGEST_BUFFER_TABLES
  value: {{ join "," .Values.tables | quote }}
- name: INGEST_BUFFER_BUFFER_MAX_BYTES
  value: {{ .Values.buffer.maxBytes | quote }}
- name: INGEST_BUFFER_BUFFER_MAX_ROWS
  value: {{ .Values.buffer.maxRows | int | quote }}
- name: INGEST_BUFFER_WHEN_FULL
  value: {{ .Values.buffer.whenFull | quote }}
- name: INGEST_BUFFER_BLOCK_TIMEOUT
  value: {{ printf "%vs" .Values.buffer.blockTimeoutSeconds | quote }}
- name: INGEST_BUFFER_MAX_REQUEST_BYTES
  value: {{ .Values.buffer.maxRequestBytes | quote }}
- name: INGEST_BUFFER_FLUSH_MAX_ROWS
  value: {{ .Values.flush.maxRows | int | quote }}
- name: INGEST_BUFFER_FLUSH_MAX_BYTES
  value: {{ .Values.flush.maxBytes | quote }}
- name: INGEST_BUFFER_FLUSH_INTERVAL
  value: {{ printf "%vs" .Values.flush.intervalSeconds | quote }}
- name: INGEST_BUFFER_DRAIN_TIMEOUT
  value: {{ printf "%ds" (int .Values.shutdown.drainTimeoutSeconds) | quote }}
- name: INGEST_BUFFER_PROPAGATION_DELAY
  value: {{ printf "%vs" .Values.shutdown.propagationDelaySeconds | quote }}
- name: INGEST_BUFFER_LINGER
  value: {{ printf "%vs" .Values.shutdown.lingerSeconds | quote }}
- name: INGEST_BUFFER_DEAD_LETTER_DIR
  value: /var/lib/ingest-buffer/dead-letters
- name: INGEST_BUFFER_DEAD_LETTER_MAX_BYTES
  value: {{ .Values.deadLetters.maxBytes | quote }}
{{- if .Values.deadLetters.table }}
- name: INGEST_BUFFER_DEAD_LETTER_TABLE
  value: {{ .Values.deadLetters.table | quote }}
{{- end }}
- name: INGEST_BUFFER_WAL_DIR
  value: {{ ternary "/var/lib/ingest-buffer/wal" "" .Values.wal.enabled | quote }}
{{- if .Values.wal.enabled }}
- name: INGEST_BUFFER_WAL_MAX_BYTES
  value: {{ .Values.wal.maxBytes | quote }}
- name: INGEST_BUFFER_WAL_SYNC_INTERVAL
  value: {{ printf "%vs" .Values.wal.syncIntervalSeconds | quote }}
{{- end }}
{{- if .Values.clickhouseHttp.enabled }}
{{- $gateway := eq .Values.mode "gateway" }}
{{- if and $gateway (eq .Values.clickhouseHttp.auth "users-file") (not .Values.clickhouseHttp.usersSecret) }}
{{- fail "clickhouseHttp.auth is users-file but clickhouseHttp.usersSecret is empty: name a Secret with a `users` key (lines of user:password or user:sha256:HEX)" }}
{{- end }}
- name: INGEST_BUFFER_CLICKHOUSE_HTTP_LISTEN
  value: {{ printf "%s:%d" (ternary "0.0.0.0" "127.0.0.1" $gateway) (int .Values.clickhouseHttp.port) | quote }}
- name: INGEST_BUFFER_CLICKHOUSE_HTTP_AUTH
  value: {{ ternary .Values.clickhouseHttp.auth "none" $gateway | quote }}
{{- if and $gateway (eq .Values.clickhouseHttp.auth "users-file") }}
- name: INGEST_BUFFER_CLICKHOUSE_HTTP_USERS_FILE
  value: /etc/ingest-buffer/http-users/users
{{- end }}
{{- end }}
- name: INGEST_BUFFER_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: INGEST_BUFFER_LOG_FORMAT
  value: json
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ingest-buffer.container" -}}
name: ingest-buffer
image: {{ include "ingest-buffer.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve"]
env:
  {{- include "ingest-buffer.env" . | nindent 2 }}
ports:
  {{- if not .Values.grpc.unixSocket }}
  - name: grpc
    containerPort: {{ .Values.grpc.port }}
    protocol: TCP
  {{- end }}
  - name: http
    containerPort: {{ .Values.http.port }}
    protocol: TCP
  {{- if and .Values.clickhouseHttp.enabled (eq .Values.mode "gateway") }}
  - name: clickhouse-http
    containerPort: {{ .Values.clickhouseHttp.port }}
    protocol: TCP
  {{- end }}
startupProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 1
  failureThreshold: 60
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 1
livenessProbe:
  httpGet:
    path: /livez
    port: http
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
lifecycle:
  preStop:
    exec:
      command: ["ingest-buffer", "drain", "--timeout", "{{ add (int .Values.shutdown.drainTimeoutSeconds) 5 }}"]
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: ingest-buffer-data
    mountPath: /var/lib/ingest-buffer
  {{- if .Values.wal.enabled }}
  - name: ingest-buffer-wal
    mountPath: /var/lib/ingest-buffer/wal
  {{- end }}
  {{- if include "ingest-buffer.passwordSecret" . }}
  - name: ingest-buffer-clickhouse
    mountPath: /etc/ingest-buffer/clickhouse
    readOnly: true
  {{- end }}
  {{- if .Values.clickhouse.caSecret }}
  - name: ingest-buffer-ca
    mountPath: /etc/ingest-buffer/ca
    readOnly: true
  {{- end }}
  {{- if .Values.grpc.unixSocket }}
  - name: ingest-buffer-socket
    mountPath: {{ dir .Values.grpc.unixSocket }}
  {{- end }}
  {{- if include "ingest-buffer.httpUsers" . }}
  - name: ingest-buffer-http-users
    mountPath: /etc/ingest-buffer/http-users
    readOnly: true
  {{- end }}
{{- end }}

{{/*
"true" when the ClickHouse HTTP listener takes its users from a Secret (gateway mode, users-file).
*/}}
{{- define "ingest-buffer.httpUsers" -}}
{{- if and .Values.clickhouseHttp.enabled (eq .Values.mode "gateway") (eq .Values.clickhouseHttp.auth "users-file") }}true{{ end }}
{{- end }}

{{- define "ingest-buffer.sidecar" -}}
{{- if semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version }}
{{- fail (printf "the ingest-buffer.sidecar template is a native sidecar (an init container with restartPolicy Always), which needs Kubernetes 1.29 or later, and this cluster is %s: include ingest-buffer.container among the pod's containers instead (it then relies on shutdown.lingerSeconds)" .Capabilities.KubeVersion.Version) }}
{{- end -}}
- {{ include "ingest-buffer.container" . | indent 2 | trim }}
  # A native sidecar: started before the application, stopped after it (Kubernetes >= 1.29).
  restartPolicy: Always
{{- end }}

{{/*
"true" when the log lives on a PersistentVolumeClaim per replica (gateway mode, a StatefulSet).
*/}}
{{- define "ingest-buffer.walClaim" -}}
{{- if and .Values.wal.enabled .Values.wal.persistence.enabled (eq .Values.mode "gateway") }}true{{ end }}
{{- end }}

{{- define "ingest-buffer.volumes" -}}
- name: ingest-buffer-data
{{- if .Values.deadLetters.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.deadLetters.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.deadLetters.sizeLimit }}
{{- end }}
{{- if and .Values.wal.enabled (not (include "ingest-buffer.walClaim" .)) }}
- name: ingest-buffer-wal
  emptyDir:
    sizeLimit: {{ .Values.wal.sizeLimit }}
{{- end }}
{{- if include "ingest-buffer.passwordSecret" . }}
- name: ingest-buffer-clickhouse
  secret:
    secretName: {{ include "ingest-buffer.passwordSecret" . }}
    items:
      - key: {{ if .Values.clickhouse.existingSecret }}{{ .Values.clickhouse.existingSecretKey }}{{ else }}password{{ end }}
        path: password
{{- end }}
{{- if .Values.clickhouse.caSecret }}
- name: ingest-buffer-ca
  secret:
    secretName: {{ .Values.clickhouse.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if .Values.grpc.unixSocket }}
- name: ingest-buffer-socket
  emptyDir: {}
{{- end }}
{{- if include "ingest-buffer.httpUsers" . }}
- name: ingest-buffer-http-users
  secret:
    secretName: {{ .Values.clickhouseHttp.usersSecret }}
    items:
      - key: users
        path: users
{{- end }}
{{- end }}
